"""``flopwise batch`` records: the input lines, the output records, and what a rerun finds done.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body"}``. Each output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}`` or, when the line could not be served, ``{"id", "custom_id", "response": null, "error":
{"code", "message", "line"}}``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Line:
    number: int  # 1-based line number in the input
    custom_id: str | None = None  # set for the first line with a given id only
    url: str | None = None
    body: dict | None = None
    error: str | None = None
    code: str = "invalid_line"

    @property
    def key(self) -> tuple[str, object]:
        """What marks this line done in the output: its custom_id, else its line number."""
        return ("id", self.custom_id) if self.custom_id is not None else ("line", self.number)


@dataclass
class Summary:
    done: int = 0
    errors: int = 0
    skipped: int = 0
    capped: int = 0
    charged: float = 0
    baseline: float = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, tuple[int, float]] = field(default_factory=dict)  # --ray: lines and FLOPs per replica
    up: float = 0.0  # when every engine was up and lines started to flow (epoch s)
    last_record: float = 0.0  # when the last served record was written (epoch s)
    served: int = 0  # lines that reached an engine (not the invalid ones)
    served_flops: float = 0

    def rate(self) -> tuple[float, float, float] | None:
        """(seconds, lines/s, FLOP/s) from the engines being up to the last served line; None if none was."""
        span = self.last_record - self.up
        if not (self.served and self.up and span > 0):
            return None
        return span, self.served / span, self.served_flops / span


def parse_input(path: Path) -> list[Line]:
    """Every non-blank input line, each either ready to run or carrying the reason it cannot be."""
    lines: list[Line] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = Line(number)
            lines.append(line)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # never served with replacement characters
                line.error = (
                    f"line {number} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
                )
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                line.error = f"line {number} is not valid JSON: {e.msg}"
                continue
            if not isinstance(obj, dict):
                line.error = f"line {number} is not a JSON object"
                continue
            cid = obj.get("custom_id")
            if not (isinstance(cid, str) and cid):
                line.error = f"line {number}: custom_id must be a non-empty string"
                continue
            if cid in seen:
                line.error, line.code = (
                    f"line {number}: duplicate custom_id {cid!r} (only its first line is run)",
                    "duplicate_custom_id",
                )
                continue
            seen.add(cid)
            line.custom_id = cid
            if obj.get("method", "POST") != "POST":
                line.error = f"line {number}: method must be POST, got {obj.get('method')!r}"
            elif obj.get("url") not in URLS:
                line.error = f"line {number}: url must be one of {', '.join(URLS)}, got {obj.get('url')!r}"
            elif not isinstance(obj.get("body"), dict):
                line.error = f"line {number}: body must be a JSON object"
            elif obj["body"].get("stream"):
                line.error = f"line {number}: body.stream is not supported in a batch"
            else:
                line.url, line.body = obj["url"], obj["body"]
    return lines


def already_done(output: Path) -> set[tuple[str, object]]:
    """Keys (see :attr:`Line.key`) of the records already in the output.

    A torn last line (a run killed mid-write) and records of server-side failures (status 5xx: the line
    was never served) are removed from the file first, so that those lines are redone, not duplicated.
    Lines that are not records at all (junk written there by something else) are moved to
    ``OUTPUT.junk`` rather than lost.
    """
    keys: set[tuple[str, object]] = set()
    if not output.exists():
        return keys
    kept, junk, dropped = [], [], False
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data, dropped = data[: data.rfind(b"\n") + 1], True
    for raw in data.splitlines(keepends=True):
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict):
            dropped = True
            if raw.strip():
                junk.append(raw)
            continue
        err = rec.get("error")
        if isinstance(err, dict) and (err.get("status_code") or 0) >= 500:
            dropped = True
            continue
        kept.append(raw)
        if rec.get("custom_id") is not None:
            keys.add(("id", rec["custom_id"]))
        elif isinstance(err, dict) and isinstance(err.get("line"), int):
            keys.add(("line", err["line"]))
    if junk:
        with open(output.with_name(output.name + ".junk"), "ab") as f:
            f.write(b"".join(junk))
    if dropped:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, output)
    return keys


def error_record(line: Line, code: str, message: str, status: int | None = None) -> dict:
    err = {"code": code, "message": message, "line": line.number}
    if status is not None:
        err["status_code"] = status
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": err,
    }


class Writer:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def count(summary: Summary, record: dict, replica: str | None = None, served: bool = False) -> None:
    flops = (((record.get("response") or {}).get("body") or {}).get("usage") or {}).get("flops") or {}
    if served:
        summary.served += 1
        summary.served_flops += flops.get("total", 0)
        summary.last_record = time.time()
    if replica is not None:
        n, total = summary.replicas.get(replica, (0, 0.0))
        summary.replicas[replica] = (n + 1, total + flops.get("total", 0))
    if record.get("error"):
        summary.errors += 1
        code = record["error"].get("code", "error")
        summary.error_codes[code] = summary.error_codes.get(code, 0) + 1
        return
    summary.done += 1
    summary.charged += flops.get("total", 0)
    summary.baseline += flops.get("dense_baseline", 0)
    if any(c.get("stop_reason") == "flop_budget" for c in record["response"]["body"].get("choices", [])):
        summary.capped += 1


def start(lines: list[Line], output: Path) -> tuple[Summary, Writer, list[Line]]:
    """Skip what the output already holds, write the invalid lines' error records; return the lines to run."""
    summary = Summary()
    done = already_done(output)
    todo = [line for line in lines if line.key not in done]
    summary.skipped = len(lines) - len(todo)
    writer = Writer(output)
    runnable = []
    for line in todo:
        if line.error:
            record = error_record(line, line.code, line.error)
            writer.write(record)
            count(summary, record)
        else:
            runnable.append(line)
    return summary, writer, runnable
