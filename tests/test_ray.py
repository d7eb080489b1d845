"""`flopwise batch --ray` on a local Ray cluster this module starts (one head node on 127.0.0.1, two CPUs,
token auth) and stops by PID: the same per-line results as the local run, every line exactly once after a
replica is killed mid-run, budgets held, and clear errors that lose nothing."""

import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from flopwise.ledger import FlopModel
from flopwise_serve.launch import free_port

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="the Ray extra: pip install 'flopwise[ray]' (make test installs it)")

# Every Ray server of the cluster listens on 127.0.0.1 only (Ray's single-machine mode).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# float32: greedy text identical across thread counts
ENGINE = [
    "--max-model-len",
    "512",
    "--dtype",
    "float32",
]


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="fwray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    env = {**os.environ, **LOOPBACK, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run(
            [
                ray_cli,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=2",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
                "--object-store-memory=200000000",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"127.0.0.1:{port}", env
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(temp: str) -> None:
    """SIGTERM the cluster's daemons (their command lines name its temp dir) and everything under them."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in (p.info["cmdline"] or []))]
    procs = {p.pid: p for r in roots for p in [r, *_children(r)]}
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        p.kill()


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _replicas() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::MapWorker(MapBatches(FlopwiseEngineUDF))")
    ]


def _line(i: int, max_tokens: int = 8) -> dict:
    if i % 2:
        body = {
            "messages": [{"role": "user", "content": f"hi {i}"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    body = {"prompt": f"def f{i}(x):", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}


def _batch(inp, out, model, *extra, env=None, wait=True):
    argv = [
        sys.executable,
        "-m",
        "flopwise_serve.cli",
        "batch",
        str(inp),
        "-o",
        str(out),
        "--model",
        model,
        *ENGINE,
        *extra,
    ]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _records(out: Path) -> dict[str, dict]:
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    counts = collections.Counter(r["custom_id"] for r in recs)
    assert max(counts.values()) == 1, counts.most_common(3)
    return {r["custom_id"]: r for r in recs}


def _result(rec: dict):
    """What greedy decoding makes of a line: texts, stop reasons, usage with FLOPs; or the error."""
    if rec["error"]:
        return rec["error"]["code"], rec["error"].get("status_code")
    body = rec["response"]["body"]
    texts = [
        (c.get("text") or (c.get("message") or {}).get("content"), c["finish_reason"], c["stop_reason"])
        for c in body["choices"]
    ]
    return texts, body["usage"]


@pytest.mark.long  # minutes of Ray start-up; `make test-long` runs it
def test_ray_batch_on_a_ray_instance_of_its_own(tiny_model, tmp_path):
    """`--ray` with no address: flopwise starts a Ray instance for the run, and nothing of it outlives the
    run. First in the file, so that no cluster of the other tests is there to start processes meanwhile."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(_line(i)) + "\n" for i in range(3)))
    before = {p.pid for p in psutil.process_iter()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = _batch(inp, out, tiny_model("llama-gqa"), "--ray", "--replicas", "1", env=env)
    assert r.returncode == 0 and "3 done, 0 errors" in r.stderr, r.stderr[-3000:]
    assert len(_records(out)) == 3
    time.sleep(2)
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and any(k in " ".join(p.info["cmdline"] or []) for k in ("raylet", "gcs_server", "ray::", "VLLM"))
    ]
    assert not left, [p.info["cmdline"][:2] for p in left]


def _lines(tmp_path: Path) -> Path:
    """Ten lines, one capped by its budget, one with a bad budget (400) and one that is not JSON."""
    lines = [_line(i) for i in range(10)]
    lines.append(
        {
            "custom_id": "capped",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "prompt": "def g(x):",
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": True,
                "flop_budget": 1.2e7,
            },
        }
    )
    lines.append(
        {
            "custom_id": "bad-budget",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "flop_budget": -3},
        }
    )
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return inp


def _ray_args(address: str) -> tuple[str, ...]:
    return (
        "--flop-budget",
        "5e7",
        "--ray",
        address,
        "--replicas",
        "2",
        "--batch-size",
        "2",
        "--concurrent-batches",
        "1",
    )


def _check_ray_run(r, got: dict[str, dict], ledger: FlopModel) -> None:
    """Budgets held and charged as the ledger says, both replicas served, and the summary adds up."""
    # None: the line that is not JSON
    assert got.keys() == {f"r{i}" for i in range(10)} | {"capped", "bad-budget", None}
    texts, usage = _result(got["capped"])
    assert (
        texts[0][2] == "flop_budget"
        and usage["flops"]["total"] <= 1.2e7
        and usage["flops"]["budget"] == 1.2e7
    )
    assert (
        got["bad-budget"]["error"]["status_code"] == 400
        and "flop_budget" in got["bad-budget"]["error"]["message"]
    )
    for i in range(10):
        u = got[f"r{i}"]["response"]["body"]["usage"]
        assert u["completion_tokens"] == 8
        assert u["flops"]["total"] == ledger.request(u["prompt_tokens"], u["completion_tokens"]).total
        assert u["flops"]["budget"] == 5e7  # the batch default reached every replica
    replicas = [line for line in r.stderr.splitlines() if line.strip().startswith("replica ")]
    assert len(replicas) == 2, r.stderr[-2000:]
    per = [(int(x.split(": ")[1].split()[0]), float(x.rsplit(" ", 1)[1])) for x in replicas]
    assert all(n > 0 for n, _ in per) and sum(n for n, _ in per) == 12  # the JSON line never reaches one
    charged = sum(_result(rec)[1]["flops"]["total"] for rec in got.values() if not rec["error"])
    assert sum(f for _, f in per) == pytest.approx(charged, rel=1e-3)
    assert f"FLOPs charged {charged:.4g} (all replicas)" in r.stderr


def test_ray_batch_serves_every_line_once_on_two_replicas(cluster, tiny_model, tmp_path):
    address, env = cluster
    model = tiny_model("llama-gqa")
    inp, out = _lines(tmp_path), tmp_path / "ray.jsonl"
    r = _batch(inp, out, model, *_ray_args(address), env=env)
    assert r.returncode == 1 and "11 done, 2 errors" in r.stderr, r.stderr[-3000:]  # the two bad lines
    _check_ray_run(r, _records(out), FlopModel.from_pretrained(model))


@pytest.mark.long  # three batch runs, two on Ray: ~4 min on 2 cores
def test_ray_batch_matches_the_local_run_and_resumes_after_a_failed_start(cluster, tiny_model, tmp_path):
    address, env = cluster
    model = tiny_model("llama-gqa")
    inp = _lines(tmp_path)
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"

    r = _batch(inp, local, model, "--flop-budget", "5e7")
    assert r.returncode == 1 and "2 of 13 lines failed" in r.stderr, r.stderr[-3000:]  # the two bad lines

    # A replica that cannot start (vLLM refuses the engine arguments): a clear error, nothing served written.
    r = _batch(inp, on_ray, model, *_ray_args(address), "--max-model-len", "999999", env=env)
    assert r.returncode == 2 and "the Ray run stopped" in r.stderr and "max_model_len" in r.stderr, r.stderr[
        -3000:
    ]
    # the invalid line only
    assert [json.loads(x)["response"] for x in on_ray.read_text().splitlines()] == [None]

    # The same command without the bad argument resumes: every line once, the same results as the local run.
    r = _batch(inp, on_ray, model, *_ray_args(address), env=env)
    assert r.returncode == 1, r.stderr[-3000:]  # bad-budget failed in this run
    # bad-budget is refused (400); the bad JSON line was done
    assert "11 done, 1 errors, 1 already" in r.stderr
    want, got = _records(local), _records(on_ray)
    assert got.keys() == want.keys() and len(got) == 13
    for cid in want:
        assert _result(got[cid]) == _result(want[cid]), cid
    _check_ray_run(r, got, FlopModel.from_pretrained(model))


@pytest.mark.long  # minutes of Ray start-up; `make test-long` runs it
def test_ray_batch_survives_losing_a_replica(cluster, tiny_model, tmp_path):
    address, env = cluster
    model = tiny_model("llama-gqa")
    ledger = FlopModel.from_pretrained(model)
    n = 24
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(_line(2 * i, max_tokens=48)) for i in range(n)) + "\n")
    proc = _batch(
        inp,
        out,
        model,
        "--ray",
        address,
        "--replicas",
        "2",
        "--batch-size",
        "2",
        "--concurrent-batches",
        "1",
        env=env,
        wait=False,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                break  # both replicas are up and busy: lines are handed out only once every replica started
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        victim = _replicas()[0]
        for p in [victim, *_children(victim)]:  # the replica and its engine, as if its node went away
            p.kill()
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    got = _records(out)  # asserts every custom_id appears once
    assert len(got) == n and all(rec["error"] is None for rec in got.values())
    for rec in got.values():
        u = rec["response"]["body"]["usage"]
        assert u["completion_tokens"] == 48
        assert u["flops"]["total"] == ledger.request(u["prompt_tokens"], 48).total
    assert f"{n} done, 0 errors" in stderr
    served = [line for line in stderr.splitlines() if line.strip().startswith("replica ")]
    assert len(served) >= 2 and sum(int(x.split(": ")[1].split()[0]) for x in served) == n, stderr[-2000:]


def test_ray_batch_errors_name_the_cause(cluster, tiny_model, tmp_path):
    address, env = cluster
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(_line(0)) + "\n")
    model = tiny_model("llama-gqa")

    closed = f"127.0.0.1:{free_port()}"
    r = _batch(inp, out, model, "--ray", closed, env=env)
    assert r.returncode == 2 and f"cannot reach the Ray cluster at {closed}" in r.stderr, r.stderr[-2000:]
    r = _batch(inp, out, model, "--ray", address, "--replicas", "3", env=env)
    assert (
        r.returncode == 2
        and "the Ray cluster has 2 CPUs; --replicas 3 x --cpus-per-replica 1 needs 3" in r.stderr
    )
    r = _batch(inp, out, model, "--replicas", "2")
    assert r.returncode == 2 and "--replicas only apply with --ray" in r.stderr
    assert out.read_text() == ""  # nothing was served, nothing is marked done
