"""The transformers reference for KV dropping: prefill, drop with the same policy and layout, decode.

This is the oracle the vLLM adapter is tested against. It follows kvpress's recipe on a plain
``DynamicCache``: prefill the whole prompt (full attention), score each layer's cached keys (and the
prompt's queries, captured through an attention-function wrapper) with the policy, keep the chosen
positions per KV head, then decode greedily with each new token at its original position. Under a token
budget, a policy that re-scores does so while decoding (:class:`~flopwise.techniques.kv_drop.Compaction`,
with the decode queries captured too); StreamingLLM evicts the oldest tail blocks instead.
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
    compactions: list[kd.Compaction] = field(default_factory=list)  # decode-time re-scorings, in order


def compress(
    cache,
    captured: dict[int, torch.Tensor],
    config: kd.KVDropConfig,
    lay: kd.Layout,
    seed: int = 0,
):
    """Drop, in place, what ``config`` drops of each layer of a prefilled ``DynamicCache`` (the prompt,
    scored on its own keys and queries, and maybe output recomputed after it); -> kept positions."""
    policy = kd.get_policy(config.policy)
    start, end = lay.region
    kept = []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys[0], layer.values[0]  # [Hkv, rows, d]
        queries = captured.get(i)
        ctx = kd.KVContext(
            keys=keys[:, : lay.prompt].transpose(0, 1),
            queries=policy.queries_of(None if queries is None else queries[: lay.prompt]),
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


def rescore(cache, captured: dict[int, torch.Tensor], policy: kd.KVPolicy, comp: kd.Compaction, seed: int):
    """A decode-time re-scoring, in place: each layer's candidate rows are re-scored with the last
    ``decode_window`` queries and the best per head kept (sinks first), the recent rows after them as is."""
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys[0], layer.values[0]  # [Hkv, rows, d]
        assert keys.shape[1] == comp.rows, (keys.shape, comp)
        w = policy.decode_window
        ctx = kd.KVContext(
            keys=keys.transpose(0, 1),
            queries=captured[i][-w:] if w else None,
            start=0,
            end=comp.candidates,
            layer=i,
            seed=seed,
        )
        idx = kd.keep_indices(policy, ctx, comp.new_kept * comp.block_size, sinks=kd.SINKS)
        gather = idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
        rest = slice(comp.candidates, None)
        layer.keys = torch.cat([keys.gather(1, gather), keys[:, rest]], dim=1).unsqueeze(0)
        layer.values = torch.cat([values.gather(1, gather), values[:, rest]], dim=1).unsqueeze(0)


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    config: kd.KVDropConfig | None,
    max_tokens: int,
    block_size: int,
    seed: int = 0,
    forced: list[int] | None = None,
    preempted: tuple[int, ...] = (),
) -> KVRun:
    """Greedy ``max_tokens`` tokens after ``prompt_ids`` with ``config``'s KV drop applied after prefill.
    ``forced``: decode these tokens instead (teacher forcing); ``logprobs`` then holds each one's.
    ``preempted``: sequence lengths (prompt + tokens so far) at which the engine preempted the request: there
    the cache is rebuilt as vLLM recomputes it (prompt and output prefilled with full attention, the prompt
    dropped again) and decoding goes on from it."""
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    captured: dict[int, torch.Tensor] = {}  # per layer: [queries, Hq, d], rotated; decode ones appended

    def capture(module, query, key, value, attention_mask, **kwargs):
        q = query[0].transpose(0, 1)  # [1, Hq, T, d] -> [T, Hq, d]
        seen = captured.get(module.layer_idx)
        captured[module.layer_idx] = q if seen is None or q.shape[0] > 1 else torch.cat([seen, q])[-256:]
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    before = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        P = len(prompt_ids)
        logprobs: list[float] = []
        tokens: list[int] = []
        policy = kd.get_policy(config.policy) if config is not None else None
        rescores = policy is not None and config.tokens is not None and policy.rescores
        lay = kd.layout(config, P, block_size) if config is not None else None

        def pick(logits: torch.Tensor) -> int:
            token = int(logits.argmax()) if forced is None else forced[len(tokens)]
            logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            return token

        def prefill(ids: list[int]):
            """-> the cache after prefilling ``ids`` and dropping the prompt, kept positions, logits."""
            cache = DynamicCache(config=model.config)
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
            kept = compress(cache, captured, config, lay, seed) if lay is not None and lay.active else []
            return cache, kept, out.logits[0, -1]

        cache, kept, logits = prefill(prompt_ids)
        tokens.append(pick(logits))
        start = (lay.kept, lay.full) if lay is not None and lay.active else (0, 0)
        (blocks, resume), evicted, compactions = start, 0, []
        for t in range(max_tokens - 1):
            if P + t + 1 in preempted:  # recomputed: prompt + output prefilled, the drop made anew
                cache, kept, logits = prefill(prompt_ids + tokens)
                (blocks, resume), evicted = start, 0
                tokens.append(pick(logits))
                continue
            while not rescores and config is not None and config.tokens is not None:
                if not kd.evicts(lay, evicted, P + t, config.tokens):
                    break
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
            if rescores:  # after the step's attention, as the engine does
                w = policy.decode_window
                comp = kd.compaction(blocks, resume, P + t + 1, config.tokens, block_size, w)
                if comp is not None:
                    rescore(cache, captured, policy, comp, seed)
                    blocks, resume = comp.new_kept, comp.new_resume
                    compactions.append(comp)
        return KVRun(tokens, lay, kept, evicted, logprobs, compactions)
    finally:
        model.set_attn_implementation(before)
