"""`flopwise batch`: good lines served with usage.flops, bad lines as error records, resume without
duplicates."""

import collections
import json
import subprocess
import sys

import pytest

from flopwise.ledger import FlopModel

pytestmark = pytest.mark.slow


def _lines():
    good = []
    for i in range(6):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 6, "temperature": 0}
            good.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        else:
            body = {"prompt": f"def f{i}(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            good.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
    er = {
        "custom_id": "er",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "prompt": "x =",
            "max_tokens": 8,
            "n": 4,
            "temperature": 1.0,
            "ignore_eos": True,
            "early_rejection": {"every_tokens": 2, "keep": 0.5},
        },
    }
    capped = {
        "custom_id": "capped",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "def g(x):", "max_tokens": 40, "ignore_eos": True, "flop_budget": 1.2e7},
    }
    bad = [
        "{not json",
        json.dumps(
            {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "dup"}}
        ),
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps(
            {
                "custom_id": "bad-budget",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "flop_budget": -3},
            }
        ),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}}),
        json.dumps(
            {
                "custom_id": "bad-body",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "max_tokens": "many"},
            }
        ),
        json.dumps(
            {
                "custom_id": "stream",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "stream": True},
            }
        ),
        json.dumps(
            {
                "custom_id": "bad-er",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "n": 2, "early_rejection": {"keep": 0}},
            }
        ),
    ]
    return (
        [json.dumps(x) for x in good[:3]]
        + bad[:3]
        + [json.dumps(x) for x in good[3:]]
        + bad[3:]
        + [json.dumps(capped), json.dumps(er)]
    )


def _run(inp, out, model, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flopwise_serve.cli",
            "batch",
            str(inp),
            "-o",
            str(out),
            "--model",
            model,
            "--max-model-len",
            "1024",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _records(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_batch_survives_bad_lines_and_resumes(tiny_model, tmp_path):
    model = tiny_model("llama-gqa")
    ledger = FlopModel.from_pretrained(model)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_lines()) + "\n\n")
    # What a run killed mid-write left: r0 done, r1 failed on the server's side, r2's record torn in half.
    r0 = {"id": "batch_req_0", "custom_id": "r0", "response": {"status_code": 200, "body": {}}, "error": None}
    r1 = {
        "id": "batch_req_1",
        "custom_id": "r1",
        "response": None,
        "error": {"code": "internal_error", "message": "engine died", "line": 2, "status_code": 500},
    }
    out.write_text(json.dumps(r0) + "\n" + json.dumps(r1) + "\n" + '{"id": "batch_req_2", "custom_')

    r = _run(inp, out, model, "--flop-budget", "5e7")  # the default for lines that set no budget
    assert r.returncode == 1, r.stderr[-3000:]  # lines failed: not a success, and it says how many
    assert (
        "7 done, 8 errors, 1 already" in r.stderr
        and "8 of 15 lines failed" in r.stderr
        and "stopped by their FLOP budget" in r.stderr
    ), r.stderr[-3000:]
    recs = _records(out)
    counts = collections.Counter(rec["custom_id"] or ("line", rec["error"]["line"]) for rec in recs)
    assert len(recs) == 16 and max(counts.values()) == 1  # each line once: r1 and r2 redone, r0 not
    by_id = {rec["custom_id"]: rec for rec in recs if rec["custom_id"]}
    assert by_id["r0"] == r0
    for i in range(1, 6):
        body = by_id[f"r{i}"]["response"]["body"]
        u = body["usage"]
        assert by_id[f"r{i}"]["response"]["status_code"] == 200 and by_id[f"r{i}"]["error"] is None
        assert u["flops"]["total"] == ledger.request(u["prompt_tokens"], u["completion_tokens"]).total
        assert u["flops"]["budget"] == 5e7  # the batch default applied
    cap = by_id["capped"]["response"]["body"]
    assert cap["choices"][0]["stop_reason"] == "flop_budget" and cap["usage"]["flops"]["total"] <= 1.2e7
    assert cap["usage"]["flops"]["budget"] == 1.2e7  # a line's own budget wins over the default
    assert (
        by_id["bad-budget"]["error"]["status_code"] == 400
        and "flop_budget" in by_id["bad-budget"]["error"]["message"]
    )
    assert "url must be" in by_id["bad-url"]["error"]["message"]
    assert "max_tokens" in by_id["bad-body"]["error"]["message"]
    assert "stream" in by_id["stream"]["error"]["message"]
    er = by_id["er"]["response"]["body"]
    assert (
        er["early_rejection"]["rejected"] == 3
        and len(er["choices"]) == 1
        and er["usage"]["flops"]["total"] > 0
    )
    assert (
        by_id["bad-er"]["error"]["status_code"] == 400
        and "early_rejection.keep" in by_id["bad-er"]["error"]["message"]
    )
    anonymous = sorted(rec["error"]["code"] for rec in recs if rec["custom_id"] is None)
    assert anonymous == ["duplicate_custom_id", "invalid_line", "invalid_line"]

    # Rerun: everything is there already (client errors included), nothing is redone or duplicated.
    r = _run(inp, out, model)
    assert r.returncode == 0 and "0 done, 0 errors, 16 already" in r.stderr, r.stderr[-2000:]
    assert _records(out) == recs


def test_batch_cli_errors_are_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flopwise_serve.cli",
            "batch",
            str(tmp_path / "missing.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "missing.jsonl" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "in.jsonl").write_text("{}\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flopwise_serve.cli",
            "batch",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--flop-budget",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--flop-budget" in r.stderr.strip().splitlines()[-1]


def test_resume_drops_torn_lines_and_server_failures(tmp_path):
    """Unit check of the resume bookkeeping: what counts as done, what is redone, nothing duplicated."""
    from flopwise_serve.batch import already_done

    out = tmp_path / "out.jsonl"
    ok = {"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}
    client_err = {
        "custom_id": "b",
        "response": None,
        "error": {"code": "x", "message": "m", "line": 2, "status_code": 400},
    }
    server_err = {
        "custom_id": "c",
        "response": None,
        "error": {"code": "internal_error", "message": "m", "line": 3, "status_code": 500},
    }
    bad_line = {
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_line", "message": "m", "line": 4},
    }
    junk = '[1, 2]\n"text"\nnot json\n\xff\xfe\n'.encode("latin-1")  # not records: kept aside, not lost
    out.write_bytes(
        "".join(json.dumps(r) + "\n" for r in (ok, client_err)).encode()
        + junk
        + "".join(json.dumps(r) + "\n" for r in (server_err, bad_line)).encode()
        + b'{"custom_id": "d", "resp'
    )
    assert already_done(out) == {("id", "a"), ("id", "b"), ("line", 4)}
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["a", "b", None]
    assert (tmp_path / "out.jsonl.junk").read_bytes() == junk


def test_undecodable_input_lines_become_error_records(tmp_path):
    from flopwise_serve.batch import parse_input

    inp = tmp_path / "in.jsonl"
    good = json.dumps({"custom_id": "ok", "url": "/v1/completions", "body": {"prompt": "caf\u00e9"}})
    inp.write_bytes(good.encode() + b"\n" + b'{"custom_id": "x\xff"}\n')
    ok, bad = parse_input(inp)
    assert ok.error is None and ok.body == {"prompt": "caf\u00e9"}
    assert bad.number == 2 and "not valid UTF-8" in bad.error and "\ufffd" not in bad.error


def test_atomic_directory_keeps_the_old_one_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    from flopwise.atomic import atomic_directory

    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src).startswith(str(tmp_path / ".model-")) and "-old-" not in str(src) and dst == out:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(out) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or aside dir left behind
    monkeypatch.setattr(os, "replace", real)
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
