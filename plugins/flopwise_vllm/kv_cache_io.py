"""Reading vLLM's CPU KV cache back: the keys and values a request holds in given blocks.

A request that drops KV after prefix-cache hits scores its whole prompt, so the worker reads the hits'
KV out of the shared blocks (never writing them). The kernel's writer (``cpu_attn_reshape_and_cache``)
defines the layout per ISA; :func:`readable_isa` checks at start-up, by a round trip through it, that
:func:`read_cache` inverts it, so a layout change fails loudly instead of scoring garbage.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops


def caches(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU backend's key and value caches, each [blocks, kv_heads, block_size, x] in its raw layout."""
    blocks, heads, block_size, _ = kv_cache.size()
    return kv_cache.view((blocks, heads, block_size * 2, -1)).chunk(2, dim=2)


# ISAs whose cache layout read_cache knows: per block and head, keys stored transposed ([head_dim,
# block_size], for the QK dot) and values as written ([block_size, head_dim]). AMX packs bf16 keys for its
# tiles: there, requests with dropping recompute their prompt instead of reading hits (readable_isa).
READABLE_ISAS = ("vec", "vec16")


def read_cache(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [len(block_ids) * block_size, kv_heads, head_dim] held in ``block_ids`` (in order)."""
    if isa not in READABLE_ISAS:
        raise ValueError(f"the CPU KV cache layout of ISA {isa!r} is not readable by flopwise")
    key_cache, value_cache = caches(kv_cache)
    ids = block_ids.long()
    n, heads, block_size, d = len(ids), key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    keys = key_cache[ids].reshape(n, heads, d, block_size).permute(0, 3, 1, 2)
    values = value_cache[ids].permute(0, 2, 1, 3)
    return keys.reshape(n * block_size, heads, d), values.reshape(n * block_size, heads, d)


def attn_isa(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU attention runs with these settings; its cache layout follows it."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, cache_dtype)


def readable_isa(vllm_config) -> bool:
    """Can the worker read this engine's cached KV back (prefix-cache hits of a request that drops)?
    Checked once by a round trip through the kernel's own writer, so a layout change fails loudly."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    isa = attn_isa(mc.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)
    if isa not in READABLE_ISAS:
        return False
    bs, heads, d = cc.block_size, 2, mc.get_head_size()
    k, v = (torch.randn(2 * bs, heads, d).to(mc.dtype) for _ in range(2))
    cache = torch.zeros(3, heads, bs, 2 * d, dtype=mc.dtype)  # three blocks, as the backend allocates them
    key_cache, value_cache = caches(cache)
    slots = torch.arange(bs, 3 * bs)  # blocks 1 and 2
    ops.cpu_attn_reshape_and_cache(
        k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )
    got_k, got_v = read_cache(cache, torch.tensor([1, 2]), isa)
    if not (torch.equal(got_k, k) and torch.equal(got_v, v)):
        raise RuntimeError(f"flopwise cannot read vLLM's CPU KV cache layout for ISA {isa!r}")
    return True
