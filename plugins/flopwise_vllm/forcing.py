"""A logits processor that makes a request generate a given continuation (teacher forcing).

For measuring perplexity *under a technique that changes the KV cache* (KV dropping): the continuation
is decoded token by token against whatever the cache kept, and with ``logprobs=0`` vLLM returns each
forced token's log-probability from the raw logits, before this processor touches them. Requests name
their continuation in ``extra_args["force_tokens"]``; others are left alone. Pass the class to
``LLM(logits_processors=[ForcedContinuation])``.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

FIELD = "force_tokens"


class ForcedContinuation(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.forced: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (continuation, output ids)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.forced.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            force = (params.extra_args or {}).get(FIELD) if params is not None else None
            if force:
                self.forced[index] = (list(force), output_ids)
            else:
                self.forced.pop(index, None)
        for a, b, direction in batch_update.moved:
            moved, other = self.forced.pop(a, None), self.forced.pop(b, None)
            if moved is not None:
                self.forced[b] = moved
            if direction == MoveDirectionality.SWAP and other is not None:
                self.forced[a] = other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (force, output_ids) in self.forced.items():
            n = len(output_ids)
            if n < len(force):
                target = logits[index, force[n]].clone()
                logits[index] = float("-inf")
                logits[index, force[n]] = target
        return logits
