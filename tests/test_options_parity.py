"""One options path: the same request gets the same answer (200, or a 400 with the same message) through
`flopwise serve`, plain `vllm serve` + vllm_xargs, `flopwise batch` and the offline API (the default budget on
every endpoint, /v1/responses and /v1/messages included, is tested in test_policy.py, on its server)."""

import json
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow
PROMPT = "def add(a, b):\n    return a + b\n"

# (name, flopwise options, n): the options as a client would set them
CASES = [
    ("budget ok", {"flop_budget": 1e12}, 1),
    ("budget negative", {"flop_budget": -1}, 1),
    ("budget string", {"flop_budget": "lots"}, 1),
    ("budget below prefill", {"flop_budget": 1e3}, 1),
    ("rejection ok", {"early_rejection": {"every_tokens": 2, "keep": 0.5}}, 2),
    ("rejection keep", {"early_rejection": {"keep": 2}}, 2),
    ("rejection beam", {"early_rejection": {"mode": "beam"}}, 2),  # was run as reject mode via vllm_xargs
    ("rejection n=1", {"early_rejection": {"every_tokens": 2}}, 1),  # was accepted via vllm_xargs
    ("rejection prm", {"early_rejection": {"prm": "verifier:nope"}}, 2),
    ("kv ok", {"kv_policy": "snapkv", "kv_keep": 0.5}, 1),
    ("kv keep", {"kv_keep": 1.5}, 1),
    ("kv policy", {"kv_policy": "lru", "kv_keep": 0.5}, 1),
    ("kv both", {"kv_keep": 0.5, "kv_keep_tokens": 200}, 1),
]


@pytest.fixture(scope="module")
def setup(server, vllm_server, tmp_path_factory):
    """The shared servers (conftest.py): neither sets a default budget, nor do the batch and offline runs."""
    plain, ledger, path = vllm_server
    return {
        "path": path,
        "ledger": ledger,
        "ours": server[0],
        "plain": plain,
        "tmp": tmp_path_factory.mktemp("p"),
    }


def _body(path, opts, n, xargs: bool):
    body = {
        "model": path,
        "prompt": PROMPT,
        "max_tokens": 6,
        "n": n,
        "temperature": 0.8 if n > 1 else 0,
        "seed": 0,
        "ignore_eos": True,
    }
    if not xargs:
        return {**body, **opts}
    # vllm_xargs values are str/int/float/list: the early_rejection object travels as JSON text
    return {**body, "vllm_xargs": {k: json.dumps(v) if isinstance(v, dict) else v for k, v in opts.items()}}


def _http(url, body) -> tuple[int, str]:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    return r.status_code, (r.json().get("error", {}).get("message", "") if r.status_code != 200 else "")


def _batch(setup) -> dict[str, tuple[int, str]]:
    inp, out = setup["tmp"] / "in.jsonl", setup["tmp"] / "out.jsonl"
    inp.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": name,
                    "url": "/v1/completions",
                    "body": _body(setup["path"], opts, n, xargs=False),
                }
            )
            + "\n"
            for name, opts, n in CASES
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flopwise_serve.cli",
            "batch",
            str(inp),
            "-o",
            str(out),
            "--model",
            setup["path"],
            "--max-model-len",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode in (0, 1), r.stderr[-3000:]
    got = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        err = rec["error"]
        got[rec["custom_id"]] = (200, "") if err is None else (err["status_code"], err["message"])
    return got


def _offline(setup, monkeypatch) -> dict[str, tuple[int, str]]:
    from vllm import SamplingParams

    from flopwise.techniques import OptionError
    from flopwise_serve.offline import LLM

    monkeypatch.delenv("FLOPWISE_DEFAULTS", raising=False)
    llm = LLM(setup["path"], dtype="float32", max_model_len=1024)
    got = {}
    try:
        for name, opts, n in CASES:
            params = SamplingParams(
                max_tokens=6, n=n, temperature=0.8 if n > 1 else 0, seed=0, ignore_eos=True
            )
            try:
                llm.generate([PROMPT], params, options=opts)
                got[name] = (200, "")
            except OptionError as e:
                got[name] = (400, str(e))
    finally:
        llm.shutdown()
    return got


def _http_answers(setup) -> tuple[dict, dict]:
    path = setup["path"]
    ours = {name: _http(setup["ours"].url, _body(path, opts, n, xargs=False)) for name, opts, n in CASES}
    plain = {name: _http(setup["plain"].url, _body(path, opts, n, xargs=True)) for name, opts, n in CASES}
    return ours, plain


def _same(ours: dict, others: dict[str, dict]) -> None:
    for name, _, _ in CASES:
        status, message = ours[name]
        assert status == (200 if name.endswith("ok") else 400), (name, ours[name])
        for other, answers in others.items():
            assert answers[name][0] == status and message in answers[name][1], (
                name,
                other,
                ours[name],
                answers[name],
            )


def test_the_same_request_gets_the_same_answer_over_http(setup):
    """`flopwise serve` and plain `vllm serve` + vllm_xargs (the servers the suite shares)."""
    ours, plain = _http_answers(setup)
    _same(ours, {"vllm serve": plain})


@pytest.mark.long  # two more engine start-ups (a batch run and an offline LLM): ~2 min on 2 cores
def test_the_same_request_gets_the_same_answer_on_every_path(setup, monkeypatch):
    ours, plain = _http_answers(setup)
    _same(ours, {"vllm serve": plain, "batch": _batch(setup), "offline": _offline(setup, monkeypatch)})
