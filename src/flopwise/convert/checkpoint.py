"""Resumable training state for a transform's distillation: ``OUT.distill/`` beside the output.

It holds the student's weights, the optimizer's state and where the run stands (``checkpoint.pt``, replaced
atomically, so a run killed at any moment leaves the last complete one), and the fingerprint of what made it
(``fingerprint.json``: the source model and every argument that changes the result). A resume with another
fingerprint is refused naming what differs, and nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from flopwise.convert.io import ConvertError


def fingerprint_source(model_dir: str) -> dict:
    """What identifies a local model: its absolute path, config.json's hash, and its weight files' sizes."""
    root = Path(model_dir).resolve()
    config = (root / "config.json").read_bytes()
    weights = sorted((p.name, p.stat().st_size) for p in root.glob("*.safetensors"))
    return {
        "path": str(root),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "weights": [list(w) for w in weights],
    }


class DistillCheckpoint:
    def __init__(self, out: str | os.PathLike, fingerprint: dict):
        self.dir = Path(f"{out}.distill")
        self.fingerprint = fingerprint
        self.file = self.dir / "checkpoint.pt"

    def exists(self) -> bool:
        return self.file.exists()

    def check(self, resume: bool) -> None:
        """Refuse, before any weight is loaded, what would lose or mix up work: a checkpoint left by an
        interrupted run when not resuming, a resume with nothing to resume, or one made from other
        arguments (the message names them, as ``--flag old → new``)."""
        if not resume:
            if self.exists():
                raise ConvertError(
                    f"a distillation checkpoint exists at {self.dir} (step {self._saved_step()}): pass "
                    "--resume to continue it, or delete that directory to start over"
                )
            return
        if not self.exists():
            raise ConvertError(f"--resume: no distillation checkpoint at {self.dir}")
        saved = json.loads((self.dir / "fingerprint.json").read_text())
        diff = [
            k for k in sorted(set(saved) | set(self.fingerprint)) if saved.get(k) != self.fingerprint.get(k)
        ]
        if diff:
            said = "; ".join(
                f"{_flag(k)}: {_short(saved.get(k))} → {_short(self.fingerprint.get(k))}" for k in diff
            )
            raise ConvertError(
                f"--resume: the checkpoint at {self.dir} was made from other arguments ({said}); run with "
                "those, or delete that directory to start over"
            )

    def _saved_step(self) -> int | str:
        try:
            import torch

            # mmap: only the small state is read, not the weights and optimizer moments (GBs for a real model)
            return torch.load(self.file, map_location="cpu", weights_only=False, mmap=True)["state"]["step"]
        except Exception:  # an unreadable file is still not ours to delete
            return "?"

    def load(self) -> dict:
        import torch

        return torch.load(self.file, map_location="cpu", weights_only=False)

    def save(self, student, optimizer, state) -> None:
        import dataclasses

        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        fp = self.dir / "fingerprint.json"
        if not fp.exists():
            fp.write_text(json.dumps(self.fingerprint, indent=1) + "\n")
        tmp = self.dir / "checkpoint.pt.tmp"
        torch.save(
            {
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": dataclasses.asdict(state),
            },
            tmp,
        )
        os.replace(tmp, self.file)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _flag(key: str) -> str:
    return "MODEL" if key == "source" else "--" + key.replace("_", "-")


def _short(value) -> str:
    if isinstance(value, dict) and "path" in value:
        return value["path"] + (
            "" if value.get("config_sha256") is None else f" (config {value['config_sha256'][:8]})"
        )
    return json.dumps(value)
