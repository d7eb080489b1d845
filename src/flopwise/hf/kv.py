"""The transformers reference for KV dropping: prefill, drop with the same policy and layout, decode.

This is the oracle the vLLM adapter is tested against. It follows kvpress's recipe on a plain
``DynamicCache``: prefill the whole prompt (full attention), score each layer's cached keys (and the
prompt's queries, captured through an attention-function wrapper) with the policy, keep the chosen
positions per KV head, then decode greedily with each new token at its original position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flopwise.techniques import kv_drop as kd

_CAPTURE = "flopwise_kv_capture"


@dataclass
class KVRun:
    tokens: list[int]
    layout: kd.Layout | None
    kept: list[torch.Tensor] = field(default_factory=list)  # per layer: [kv_heads, kept] positions
    evicted: int = 0  # tail blocks evicted while decoding (token budget)
    logprobs: list[float] = field(default_factory=list)  # of each token generated (or forced)


def compress(
    cache,
    captured: dict[int, torch.Tensor],
    config: kd.KVDropConfig,
    lay: kd.Layout,
    seed: int = 0,
):
    """Drop, in place, what ``config`` drops of each layer of a prefilled ``DynamicCache``; -> kept
    positions."""
    policy = kd.get_policy(config.policy)
    start, end = lay.region
    kept = []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys[0], layer.values[0]  # [Hkv, P, d]
        queries = captured.get(i)
        ctx = kd.KVContext(
            keys=keys.transpose(0, 1),
            queries=policy.queries_of(queries),
            start=start,
            end=end,
            layer=i,
            seed=seed,
        )
        idx = kd.keep_indices(policy, ctx, lay.kept_region_tokens)  # [Hkv, m]
        gather = idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
        layer.keys = torch.cat([keys[:, :start], keys.gather(1, gather), keys[:, end:]], dim=1).unsqueeze(0)
        layer.values = torch.cat(
            [values[:, :start], values.gather(1, gather), values[:, end:]], dim=1
        ).unsqueeze(0)
        kept.append(idx)
    return kept


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    config: kd.KVDropConfig | None,
    max_tokens: int,
    block_size: int,
    seed: int = 0,
    forced: list[int] | None = None,
) -> KVRun:
    """Greedy ``max_tokens`` tokens after ``prompt_ids`` with ``config``'s KV drop applied after prefill.
    ``forced``: decode these tokens instead (teacher forcing); ``logprobs`` then holds each one's."""
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    captured: dict[int, torch.Tensor] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] > 1:  # the prefill: [1, Hq, P, d] rotated queries
            captured[module.layer_idx] = query[0].transpose(0, 1)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    before = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        P = len(prompt_ids)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        logprobs: list[float] = []

        def pick(logits: torch.Tensor) -> int:
            token = int(logits.argmax()) if forced is None else forced[len(tokens)]
            logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            return token

        tokens: list[int] = []
        tokens.append(pick(out.logits[0, -1]))
        lay = kd.layout(config, P, block_size) if config is not None else None
        kept = compress(cache, captured, config, lay, seed) if lay is not None and lay.active else []
        evicted = 0
        for t in range(max_tokens - 1):
            while (
                lay is not None
                and config.tokens is not None
                and kd.evicts(lay, evicted, P + t, config.tokens)
            ):
                at = (lay.protected + lay.kept) * block_size  # the oldest tail block, in the cache's rows
                for layer in cache.layers:
                    layer.keys = torch.cat(
                        [layer.keys[:, :, :at], layer.keys[:, :, at + block_size :]], dim=2
                    )
                    layer.values = torch.cat(
                        [layer.values[:, :, :at], layer.values[:, :, at + block_size :]], dim=2
                    )
                evicted += 1
            length = cache.get_seq_length()
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=cache,
                use_cache=True,
                position_ids=torch.tensor([[P + t]]),
                cache_position=torch.tensor([length]),
            )
            tokens.append(pick(out.logits[0, -1]))
        return KVRun(tokens, lay, kept, evicted, logprobs)
    finally:
        model.set_attn_implementation(before)
