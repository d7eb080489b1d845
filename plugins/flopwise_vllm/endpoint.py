"""``vllm.endpoint_plugins`` entry: puts the flopwise handlers in place once vLLM's app state exists.

vLLM only loads endpoint plugins named in ``VLLM_PLUGINS``; ``flopwise serve`` sets that for you.
"""

from __future__ import annotations

from flopwise_vllm.serving import FlopChatMixin, FlopCompletionMixin, extend


class FlopwiseEndpointPlugin:
    name = "flopwise_serving"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        """flopwise adds no routes: it extends vLLM's own chat and completion handlers."""

    async def init_state(self, engine_client, state, args) -> None:
        from flopwise_vllm import check_surfaces

        check_surfaces()
        from flopwise.ledger import FlopModel, LedgerError
        from flopwise_vllm import options
        from flopwise_vllm.kv_drop import kv_supported, runs_worker

        config = engine_client.vllm_config
        try:  # admission and the KV check need the served model's ledger in this process
            model = FlopModel.from_pretrained(config.model_config.hf_config.to_dict())
            options.set_served(
                model, kv_supported(config, model), config.model_config.logprobs_mode, runs_worker(config)
            )
        except LedgerError:
            pass  # served as stock vLLM would (the platform logged why)
        # Routes look the handler up on app.state per request, so extending the instances is enough.
        for attr, mixin in (
            ("openai_serving_chat", FlopChatMixin),
            ("openai_serving_completion", FlopCompletionMixin),
        ):
            handler = getattr(state, attr, None)
            if handler is not None:
                extend(handler, mixin)
