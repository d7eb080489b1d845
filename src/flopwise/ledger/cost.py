"""Analytic FLOP model of one forward pass, one vision encoding and one whole request.

Convention (the same as vLLM's ``vllm/v1/metrics/perf.py``):

* matmul FLOPs only, 2 per multiply-accumulate; norms, activations, softmax, RoPE are not counted;
* attention is causal and counted as computed: the token at position ``i`` attends to ``i + 1``
  positions (capped by a sliding window), QK^T and AV each cost ``2 * q_heads * head_dim`` per pair;
* logits are charged only where the engine computes them: one row per sequence per forward pass;
* generating O tokens from P prompt tokens = one prefill forward over the P - cached prompt tokens
  + O - 1 single-token decode forwards, each against its whole context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flopwise.ledger.spec import LayerSpec, LedgerError, ModelSpec, VisionSpec, parse_spec

COMPONENTS = (
    "qkv",
    "attention",
    "o_proj",
    "mlp",
    "router",
    "experts",
    "shared_experts",
    "lm_head",
    "vision",
    "kv_scoring",
)


@dataclass
class Breakdown:
    """FLOPs per component. Integers, so sums over many steps stay exact."""

    flops: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def add(self, component: str, value: int) -> None:
        if value:
            self.flops[component] = self.flops.get(component, 0) + int(value)

    def __iadd__(self, other: Breakdown) -> Breakdown:
        for k, v in other.flops.items():
            self.add(k, v)
        return self

    def __add__(self, other: Breakdown) -> Breakdown:
        out = Breakdown(dict(self.flops))
        out += other
        return out

    def as_dict(self) -> dict[str, int]:
        return {k: self.flops[k] for k in COMPONENTS if k in self.flops}


def context_sum(start: int, tokens: int, window: int | None = None) -> int:
    """Sum over positions ``start .. start+tokens-1`` of each token's attention context ``min(i+1,
    window)``."""
    if tokens <= 0:
        return 0
    first, last = start + 1, start + tokens  # contexts before the window cap
    if window is None or last <= window:
        return (first + last) * tokens // 2
    if first > window:
        return window * tokens
    below = (first + window) * (window - first + 1) // 2
    return below + window * (last - window)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise LedgerError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class RequestCost:
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    images: int
    prefill: Breakdown
    decode: Breakdown

    @property
    def total(self) -> int:
        return self.prefill.total + self.decode.total

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "images": self.images,
            "prefill": self.prefill.total,
            "decode": self.decode.total,
            "total": self.total,
            "components": (self.prefill + self.decode).as_dict(),
        }


class FlopModel:
    """The cost model of one architecture. Build it with :meth:`from_pretrained` or from a spec."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        # The scheduler calls forward() for every request on every step: precompute, per distinct layer
        # shape, its FLOPs per token and per unit of attention context, so a call is a few multiplies.
        groups: dict[LayerSpec, int] = {}
        for layer in spec.layers:
            groups[layer] = groups.get(layer, 0) + 1
        self._groups = [
            (layer.window, count, self._per_token(layer), 4 * layer.q_heads * layer.head_dim)
            for layer, count in groups.items()
        ]

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | Mapping, image_size: int = 448) -> FlopModel:
        return cls(parse_spec(dict(model) if isinstance(model, Mapping) else model, image_size=image_size))

    # -- one forward pass -------------------------------------------------------------------------
    def _per_token(self, layer: LayerSpec) -> dict[str, int]:
        """FLOPs per new token of one layer, attention excluded (it depends on the context)."""
        D = self.spec.hidden
        q, kv, d = layer.q_heads, layer.kv_heads, layer.head_dim
        out = {"qkv": 2 * D * (q + 2 * kv) * d, "o_proj": 2 * q * d * D}
        if layer.moe is None:
            out["mlp"] = 6 * D * layer.ffn
            return out
        m = layer.moe
        out["router"] = 2 * D * m.num_experts
        out["experts"] = 6 * D * m.expert_ffn * m.top_k
        if m.shared_ffn:
            out["shared_experts"] = 6 * D * m.shared_ffn + (2 * D if m.shared_gate else 0)
        return out

    def forward(
        self,
        tokens: int,
        start: int = 0,
        logits: int = 1,
        context: Iterable[int] | int | None = None,
    ) -> Breakdown:
        """FLOPs of one forward over ``tokens`` new tokens at positions ``start..start+tokens-1``.

        ``logits``: how many of those positions get logits. ``context``: the summed attention context
        per layer when a technique shortens it (one int for all layers, or one per layer); by default
        every token sees its whole causal prefix.
        """
        out = Breakdown()
        if tokens <= 0:
            return out
        if context is None:
            for window, count, per_token, attn in self._groups:
                for component, value in per_token.items():
                    out.add(component, count * tokens * value)
                out.add("attention", count * attn * context_sum(start, tokens, window))
        else:
            per_layer = [context] * self.spec.num_layers if isinstance(context, int) else list(context)
            if len(per_layer) != self.spec.num_layers:
                raise LedgerError(f"context has {len(per_layer)} entries for {self.spec.num_layers} layers")
            for layer, ctx in zip(self.spec.layers, per_layer):
                for component, value in self._per_token(layer).items():
                    out.add(component, tokens * value)
                out.add("attention", 4 * layer.q_heads * layer.head_dim * ctx)
        out.add("lm_head", 2 * logits * self.spec.hidden * self.spec.vocab)
        return out

    # -- vision ------------------------------------------------------------------------------------
    def vision(
        self,
        images: int = 1,
        tokens_per_image: int | None = None,
        kept_after_layer: int | None = None,
        projected: int | None = None,
        grid: tuple[int, int, int] | None = None,
        crops: int | None = None,
    ) -> Breakdown:
        """Vision tower + projector for ``images`` images of ``tokens_per_image`` LM tokens each.

        ``kept_after_layer`` (CLIP towers): the image's tokens were dropped to ``tokens_per_image`` inside the
        tower, after that many layers; the later layers run on the kept tokens (and the class token) only.
        ``projected``: tokens the projector ran on, if not the kept ones (a method that selects on its
        output projects every token). ``grid``: the image's (t, h, w) in LM tokens, which sets Qwen2.5-VL's
        attention windows; without it (the front end before the grid is known) every window is counted as
        one LM token, the least the image can cost. ``crops`` (anyres LLaVA): the tower runs on the base view
        and this many crops (without it, the fewest any image has); pass ``projected``, as the newlines
        between rows are LM tokens the projector does not make.
        """
        out = Breakdown()
        v = self.spec.vision
        if images <= 0:
            return out
        if v is None:
            raise LedgerError(f"{self.spec.architecture} has no vision tower: it cannot take images")
        if tokens_per_image is None and grid is None and v.kind == "qwen2_vl":
            side = math.isqrt(v.tokens_per_image)  # the default image is square
            grid = (1, side, side)
        views = 1 + (v.min_crops if crops is None else crops) if v.min_crops else 1
        one = self._one_image(
            v, tokens_per_image or v.tokens_per_image, kept_after_layer, projected, grid, views
        )
        out.add("vision", images * one)
        return out

    @staticmethod
    def _one_image(
        v: VisionSpec,
        tokens: int,
        kept_after_layer: int | None = None,
        projected: int | None = None,
        grid: tuple[int, int, int] | None = None,
        views: int = 1,
    ) -> int:
        n = v.patches_for_tokens(tokens)
        cls = 1 if v.cls_token else 0
        E, F = v.hidden, v.ffn

        def layer(s: int, scores: int | None = None) -> int:  # scores: sum of squared attention spans
            mlp = (6 if v.gated else 4) * s * E * F
            return 2 * s * E * 3 * E + 4 * (s * s if scores is None else scores) * E + 2 * s * E * E + mlp

        flops = 2 * n * v.patch_in * E  # patch embedding (a strided conv = one matmul per patch)
        if v.window:
            windowed = v.layers - v.full_layers
            flops += v.full_layers * layer(n) + windowed * layer(n, _window_scores(v, tokens, grid))
        elif kept_after_layer is None:
            flops += v.layers * layer(n + cls)
            flops *= views  # anyres LLaVA: the base view and each crop, one tower run each
        else:
            early = min(kept_after_layer, v.layers)
            flops += early * layer(n + cls) + (v.layers - early) * layer(tokens + cls)
        p = tokens if projected is None else projected
        flops += 2 * p * v.proj_in * v.proj_hidden + 2 * p * v.proj_hidden * v.out_hidden
        return flops

    @property
    def tokens_per_image(self) -> int:
        if self.spec.vision is None:
            raise LedgerError(f"{self.spec.architecture} has no vision tower: it cannot take images")
        return self.spec.vision.tokens_per_image

    # -- a whole request ---------------------------------------------------------------------------
    def request(
        self,
        prompt_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        images: int = 0,
        kv_dropped: int = 0,
    ) -> RequestCost:
        """Cost of generating ``output_tokens`` from ``prompt_tokens`` text tokens plus ``images`` images.

        Each image adds its placeholder tokens to the prompt. ``cached_tokens`` prompt tokens were
        prefix-cache hits and are not recomputed (vLLM always recomputes at least the last one).
        ``kv_dropped`` prompt tokens' KV was dropped after prefill: decode attends to that many fewer.
        """
        _check_count("prompt_tokens", prompt_tokens, 1)
        _check_count("output_tokens", output_tokens, 1)
        _check_count("cached_tokens", cached_tokens, 0)
        _check_count("images", images, 0)
        _check_count("kv_dropped", kv_dropped, 0)
        P = prompt_tokens + (images * self.tokens_per_image if images else 0)
        if cached_tokens >= P:
            raise LedgerError(f"cached_tokens must be < the prompt length {P}, got {cached_tokens}")
        if kv_dropped >= P:
            raise LedgerError(f"kv_dropped must be < the prompt length {P}, got {kv_dropped}")
        prefill = self.forward(P - cached_tokens, start=cached_tokens, logits=1) + self.vision(images)
        # The O-1 decode steps process positions P..P+O-2; one closed form covers them all.
        O = output_tokens - 1
        context = context_sum(P, O) - O * kv_dropped if kv_dropped else None
        decode = self.forward(O, start=P, logits=O, context=context)
        return RequestCost(P, output_tokens, cached_tokens, images, prefill, decode)


def _window_scores(v: VisionSpec, tokens: int, grid: tuple[int, int, int] | None) -> int:
    """Sum over Qwen2.5-VL's attention windows of (patches in the window)^2: each frame's LM-token grid cut
    into ``window`` x ``window`` tiles from the top left (the last row / column of tiles may be smaller)."""
    per_token = v.merge * v.merge
    if grid is None:
        return tokens * per_token * per_token
    t, h, w = grid

    def spans(side: int) -> list[int]:
        return [v.window] * (side // v.window) + ([side % v.window] if side % v.window else [])

    return t * sum((a * b * per_token) ** 2 for a in spans(h) for b in spans(w))
