"""Start a vLLM OpenAI server (flopwise or stock) on loopback, wait until healthy, stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_ENTRY = "vllm.entrypoints.launchers.api_server.entry"  # vLLM's OpenAI server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group; ``with Server(...) as s:`` yields it healthy."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        port: int,
        log_path: str | os.PathLike,
        start_timeout: float = 240.0,
    ):
        self.argv, self.env, self.port = argv, env, port
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"server not healthy after {self.start_timeout:.0f}s; log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (vLLM's engine processes too), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def flopwise_server(model: str, port: int, log_path, vllm_args: list[str] = ()) -> Server:
    """``flopwise serve MODEL`` on 127.0.0.1:port."""
    from flopwise import hw

    argv = [sys.executable, "-m", "flopwise_serve.cli", "serve", model, "--port", str(port), *vllm_args]
    return Server(argv, hw.engine_env(), port, log_path)


def stock_server(model: str, port: int, log_path, vllm_args: list[str] = ()) -> Server:
    """Stock vLLM's OpenAI server with the same engine settings and no flopwise plugin loaded at all."""
    from flopwise import hw

    env = hw.engine_env()
    env["VLLM_PLUGINS"] = ""  # an allow-list naming nothing: no general, endpoint or stat-logger plugin loads
    argv = [
        sys.executable,
        "-m",
        VLLM_ENTRY,
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        hw.default_dtype(),
        "--enforce-eager",
        *vllm_args,
    ]
    return Server(argv, env, port, log_path)


def vllm_serve(
    model: str,
    port: int,
    log_path,
    vllm_args: list[str] = (),
    env: dict[str, str] | None = None,
    plugins: str | None = None,
) -> Server:
    """Plain ``vllm serve MODEL`` (the console script) on 127.0.0.1:port, as a user with flopwise installed
    runs it: no plugin allow-listed or named, so only what loads by itself (general and platform plugins)
    does; ``plugins``: a ``VLLM_PLUGINS`` allow-list instead (e.g. with flopwise's endpoint plugin)."""
    import shutil

    from flopwise import hw

    cli = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if cli is None:
        raise RuntimeError("the `vllm` console script is missing from the venv (tools/vllm-alias)")
    env = dict(hw.engine_env() if env is None else env)
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    argv = [
        cli,
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        *vllm_args,
    ]
    return Server(argv, env, port, log_path)
