"""Read the shapes the cost model needs from a Hugging Face ``config.json``.

Only the config is read (no weights), so ``flopwise flops`` works on a directory that holds nothing
else. Every family is parsed explicitly: an architecture we do not know is an error, never a guess.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


class LedgerError(ValueError):
    """A config the ledger cannot cost: unknown architecture, missing field, unreadable file."""


class UnsupportedArchitecture(LedgerError):
    pass


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_ffn: int
    shared_ffn: int = 0  # Qwen2-MoE shared expert (0 = none)
    shared_gate: bool = False  # Qwen2-MoE sigmoid gate on the shared expert: Linear(D, 1)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer. ``window`` caps each token's attention context (sliding window)."""

    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense gated-MLP width, 0 when the layer is MoE
    moe: MoESpec | None = None
    window: int | None = None


@dataclass(frozen=True)
class VisionSpec:
    """A vision tower plus projector; costs are per image of ``patches`` patches."""

    kind: str  # "clip" (LLaVA) or "qwen2_vl"
    hidden: int
    ffn: int
    layers: int  # layers the engine actually runs
    patches: int  # patches per image at the default resolution
    patch_in: int  # input values per patch (channels x patch pixels [x temporal patch])
    cls_token: bool  # CLIP prepends a class token to the sequence
    tokens_per_image: int  # embeddings handed to the language model
    proj_in: int  # projector input width
    proj_hidden: int  # projector hidden width
    out_hidden: int  # language-model hidden size
    merge: int = 1  # Qwen2-VL merges merge x merge patches into one token
    patch_size: int = 14
    window: int = 0  # Qwen2.5-VL: attention windows of window x window LM tokens (0: whole-image attention)
    full_layers: int = 0  # ... of the layers, these attend to the whole image
    gated: bool = False  # SwiGLU MLP (three matrices) instead of two
    min_crops: int = 0  # anyres LLaVA: the fewest crops beside the base view (0: one view only)

    def patches_for_tokens(self, tokens: int) -> int:
        """Patches behind ``tokens`` language-model tokens (Qwen2-VL images vary in size)."""
        return tokens * self.merge * self.merge if self.kind == "qwen2_vl" else self.patches


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    hidden: int
    vocab: int
    layers: tuple[LayerSpec, ...]
    vision: VisionSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_moe(self) -> bool:
        return any(layer.moe is not None for layer in self.layers)

    @property
    def windowed(self) -> bool:
        """Does any layer attend through a sliding window?"""
        return any(layer.window is not None for layer in self.layers)


DENSE = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
}
MOE = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"}
QWEN_VL = {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"}
ANYRES = {"LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"}
LLAVA = {"LlavaForConditionalGeneration"} | ANYRES
VLM = LLAVA | QWEN_VL
SUPPORTED = sorted(DENSE | MOE | VLM)


def load_config(model: str | os.PathLike | dict) -> dict:
    """A config dict from a dict, a ``config.json`` path, or a model directory."""
    if isinstance(model, dict):
        return model
    path = os.fspath(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise LedgerError(f"no config.json at {os.fspath(model)!r}: not a model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LedgerError(f"{path} is not valid JSON: {e}") from None


def _req(cfg: dict, key: str, where: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise LedgerError(f"config field {key!r} is missing from {where}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LedgerError(f"config field {key!r} in {where} must be a positive integer, got {value!r}")
    return value


def _text_layers(cfg: dict, arch: str) -> tuple[LayerSpec, ...]:
    where = f"{arch} config"
    hidden = _req(cfg, "hidden_size", where)
    n_layers = _req(cfg, "num_hidden_layers", where)
    q_heads = _req(cfg, "num_attention_heads", where)
    kv_heads = cfg.get("num_key_value_heads") or q_heads
    # An explicit head_dim is what makes query-head-reduced checkpoints (q_heads x head_dim != hidden).
    head_dim = cfg.get("head_dim") or hidden // q_heads
    if q_heads % kv_heads:
        raise LedgerError(
            f"num_attention_heads={q_heads} is not a multiple of num_key_value_heads={kv_heads}"
        )

    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
        window = None  # Qwen configs carry a sliding_window value they do not use unless asked

    moe_layers: set[int] = set()
    moe: MoESpec | None = None
    if arch == "MixtralForCausalLM":
        moe = MoESpec(
            num_experts=_req(cfg, "num_local_experts", where),
            top_k=_req(cfg, "num_experts_per_tok", where),
            expert_ffn=_req(cfg, "intermediate_size", where),
        )
        moe_layers = set(range(n_layers))
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        shared = (cfg.get("shared_expert_intermediate_size") or 0) if arch == "Qwen2MoeForCausalLM" else 0
        moe = MoESpec(
            num_experts=_req(cfg, "num_experts", where),
            top_k=_req(cfg, "num_experts_per_tok", where),
            expert_ffn=_req(cfg, "moe_intermediate_size", where),
            shared_ffn=shared,
            shared_gate=shared > 0,
        )
        step = cfg.get("decoder_sparse_step") or 1
        dense_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = {i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0}

    ffn = cfg.get("intermediate_size")
    if len(moe_layers) < n_layers:
        ffn = _req(cfg, "intermediate_size", where)

    layers = []
    for i in range(n_layers):
        is_moe = i in moe_layers
        lw = window
        if layer_types is not None and i < len(layer_types) and layer_types[i] == "full_attention":
            lw = None
        layers.append(
            LayerSpec(
                q_heads=q_heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                ffn=0 if is_moe else ffn,
                moe=moe if is_moe else None,
                window=lw,
            )
        )
    return tuple(layers)


def _clip_vision(cfg: dict, text_hidden: int, arch: str) -> VisionSpec:
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise LedgerError(f"config field 'vision_config' is missing from {arch} config")
    mt = v.get("model_type", "clip_vision_model")
    if mt not in ("clip_vision_model", "siglip_vision_model"):
        raise UnsupportedArchitecture(
            f"LLaVA vision tower {mt!r} is not supported (clip_vision_model, siglip_vision_model)"
        )
    where = "vision_config"
    hidden = _req(v, "hidden_size", where)
    ffn = _req(v, "intermediate_size", where)
    total_layers = _req(v, "num_hidden_layers", where)
    image = _req(v, "image_size", where)
    patch = _req(v, "patch_size", where)
    channels = v.get("num_channels") or 3
    feature_layer = cfg.get("vision_feature_layer", -2)
    layers_needed = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    # vLLM builds the tower only up to the deepest feature layer it reads.
    run = max(total_layers + fl + 1 if fl < 0 else fl for fl in layers_needed)
    patches = (image // patch) ** 2
    cls = mt == "clip_vision_model"
    strategy = cfg.get("vision_feature_select_strategy", "default")
    tokens = patches if (strategy == "default" or not cls) else patches + 1
    return VisionSpec(
        kind="clip",
        hidden=hidden,
        ffn=ffn,
        layers=run,
        patches=patches,
        patch_in=channels * patch * patch,
        cls_token=cls,
        tokens_per_image=tokens,
        proj_in=hidden * len(layers_needed),
        proj_hidden=text_hidden,
        out_hidden=text_hidden,
        patch_size=patch,
        min_crops=_min_crops(cfg, image, arch) if arch in ANYRES else 0,
    )


def _min_crops(cfg: dict, tile: int, arch: str) -> int:
    """LLaVA-NeXT / -OneVision: crops of the smallest pinpoint resolution (every image has that many)."""
    pinpoints = cfg.get("image_grid_pinpoints")
    if not pinpoints:
        raise LedgerError(f"config field 'image_grid_pinpoints' is missing from {arch} config")
    return min((h // tile) * (w // tile) for h, w in pinpoints)


def _qwen2vl_vision(cfg: dict, text_hidden: int, image_size: int, arch: str) -> VisionSpec:
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise LedgerError(f"config field 'vision_config' is missing from {arch} config")
    where = "vision_config"
    v25 = arch == "Qwen2_5_VLForConditionalGeneration"
    embed = _req(v, "hidden_size", where) if v25 else v.get("embed_dim") or _req(v, "hidden_size", where)
    depth = v.get("depth") or _req(v, "num_hidden_layers", where)
    mlp_ratio = v.get("mlp_ratio", 4)
    patch = v.get("patch_size", 14)
    tps = v.get("temporal_patch_size", 2)
    merge = v.get("spatial_merge_size", 2)
    channels = v.get("in_channels") or v.get("in_chans") or 3
    side = max(merge, (image_size // (patch * merge)) * merge)  # patches per side, a multiple of merge
    patches = side * side
    window = full = 0
    if v25:  # windowed attention except in fullatt_block_indexes; a SwiGLU MLP; the merger outputs out_hidden
        window = max(1, _req(v, "window_size", where) // merge // patch)
        full = len(v.get("fullatt_block_indexes") or [])
    return VisionSpec(
        kind="qwen2_vl",
        hidden=embed,
        ffn=_req(v, "intermediate_size", where) if v25 else int(embed * mlp_ratio),
        layers=depth,
        patches=patches,
        patch_in=channels * tps * patch * patch,
        cls_token=False,
        tokens_per_image=patches // (merge * merge),
        proj_in=embed * merge * merge,
        proj_hidden=embed * merge * merge,
        out_hidden=text_hidden,
        merge=merge,
        patch_size=patch,
        window=window,
        full_layers=full,
        gated=v25,
    )


def parse_spec(model: str | os.PathLike | dict, image_size: int = 448) -> ModelSpec:
    """Parse a HF config into a :class:`ModelSpec`. ``image_size`` sets Qwen2-VL's default image side."""
    cfg = load_config(model)
    archs = cfg.get("architectures") or []
    if not archs:
        raise LedgerError("config field 'architectures' is missing: cannot tell which model family this is")
    arch = archs[0]
    if arch not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not supported by the FLOP ledger (supported: {', '.join(SUPPORTED)})"
        )

    if arch in VLM:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            # Older Qwen2-VL configs keep the text fields at the top level.
            text = cfg if arch in QWEN_VL else None
        if text is None:
            raise LedgerError(f"config field 'text_config' is missing from {arch} config")
        text_arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }.get(text.get("model_type", "llama"), "LlamaForCausalLM")
        if arch in QWEN_VL:
            text_arch = "Qwen2ForCausalLM"
        hidden = _req(text, "hidden_size", "text_config")
        vocab = (
            _req(text, "vocab_size", "text_config") if "vocab_size" in text else _req(cfg, "vocab_size", arch)
        )
        vision = (
            _clip_vision(cfg, hidden, arch)
            if arch in LLAVA
            else _qwen2vl_vision(cfg, hidden, image_size, arch)
        )
        return ModelSpec(arch, hidden, vocab, _text_layers(text, text_arch), vision, extra={"config": cfg})

    hidden = _req(cfg, "hidden_size", f"{arch} config")
    vocab = _req(cfg, "vocab_size", f"{arch} config")
    return ModelSpec(arch, hidden, vocab, _text_layers(cfg, arch), None, extra={"config": cfg})
