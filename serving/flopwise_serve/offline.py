"""flopwise's offline Python API: vLLM's ``LLM`` set up as ``flopwise serve`` sets up its engine.

    from flopwise_serve.offline import LLM, flops_of

    llm = LLM()                                   # the embedded default model, dtype from the CPU
    out = llm.generate(["def fib(n):"], max_tokens=64, flop_budget=5e10)
    flops_of(out[0])                              # {"prompt", "completion", "total", "dense_baseline",
"budget"}

Plain ``SamplingParams(extra_args={"flop_budget": ...})`` works too: every request is checked by
:func:`flopwise_vllm.options.prepare`, the function the servers use, so a bad option or a prompt whose prefill
cannot fit raises :class:`flopwise.techniques.OptionError` (naming the field) before anything runs. Other
flopwise options go in ``options`` (e.g. ``{"kv_policy": "snapkv", "kv_keep": 0.25}``).
Scripts that build an ``LLM`` need an ``if __name__ == "__main__":`` guard: vLLM's workers re-import them.
"""

from __future__ import annotations

import os

from flopwise import hw
from flopwise.budget import FIELD
from flopwise.ledger import FlopModel
from flopwise.models import resolve_model


def set_engine_env() -> None:
    """flopwise's engine environment for small CPUs (small KV cache, no reserved core), unless already set."""
    for key, value in hw.engine_env({}).items():
        os.environ.setdefault(key, value)


def flops_of(output) -> dict | None:
    """``usage.flops`` of one finished ``RequestOutput`` (all its candidates), as the server reports it."""
    from flopwise_vllm.payload import PAYLOAD_KEY, FlopTotals

    payload = (output.ec_transfer_params or {}).get(PAYLOAD_KEY)
    if payload is None:
        return None
    totals = FlopTotals()
    totals.add(payload)
    return totals.usage()


class LLM:
    """A ``vllm.LLM`` with the flopwise scheduler, the CPU's dtype, eager mode and a small KV cache by
    default."""

    def __init__(self, model: str | None = None, **engine_kwargs):
        from vllm import LLM as VllmLLM

        from flopwise_vllm import SCHEDULER_CLS

        set_engine_env()
        self.model = resolve_model(model)
        self.ledger = FlopModel.from_pretrained(self.model)
        engine_kwargs.setdefault("scheduler_cls", SCHEDULER_CLS)
        engine_kwargs.setdefault("dtype", hw.default_dtype())
        engine_kwargs.setdefault("enforce_eager", True)
        self.engine = VllmLLM(self.model, **engine_kwargs)

    def generate(
        self,
        prompts,
        sampling_params=None,
        *,
        flop_budget: float | None = None,
        options: dict | None = None,
        **sampling_kwargs,
    ):
        """``vllm.LLM.generate`` with an optional per-request ``flop_budget`` (shared by n candidates) and
        other flopwise ``options``, checked for every prompt before any runs."""
        from vllm import SamplingParams

        from flopwise_vllm.options import prepare

        if sampling_params is None:
            sampling_params = SamplingParams(**sampling_kwargs)
        elif sampling_kwargs:
            raise TypeError("pass either sampling_params or sampling keyword arguments, not both")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        several = isinstance(sampling_params, (list, tuple))
        params = list(sampling_params) if several else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        tokenizer = self.engine.get_tokenizer()
        checked = []
        for prompt, sp in zip(prompts, params):
            raw = {**(sp.extra_args or {}), **(options or {})}
            if flop_budget is not None:
                raw[FIELD] = flop_budget
            if raw:
                ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tokenizer.encode(prompt)
                _, extra = prepare(raw, sp.n, [{"prompt_token_ids": ids}], model=self.ledger)
                sp = sp.clone()
                sp.extra_args = extra
            checked.append(sp)
        sampling_params = checked  # vLLM takes one SamplingParams per prompt
        return self.engine.generate(prompts, sampling_params)

    def __getattr__(self, name):
        if name == "engine":  # not built (yet): never recurse
            raise AttributeError(name)
        return getattr(self.engine, name)  # everything else is vLLM's LLM as it is

    def shutdown(self) -> None:
        self.engine.llm_engine.engine_core.shutdown()
