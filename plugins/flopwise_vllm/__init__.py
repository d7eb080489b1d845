"""flopwise's vLLM adapter. ``register()`` is the ``vllm.general_plugins`` entry point.

Each hooked vLLM surface lives in its own module (scheduler, serving, endpoint, metrics). The surfaces
are private vLLM interfaces, so the version is pinned and each one is checked at start-up: a missing
one fails with a message that names it, instead of breaking mid-request.
"""

from __future__ import annotations

import importlib
import inspect
import logging

logger = logging.getLogger("flopwise")

SUPPORTED_VLLM = "0.32.0"
SCHEDULER_CLS = "flopwise_vllm.scheduler.FlopwiseScheduler"
# KV token dropping (flopwise_vllm.kv_drop): the CPU attention backend and worker it replaces.
KV_BACKEND_CLS = "flopwise_vllm.kv_drop.FlopwiseCPUAttentionBackend"
# Stock architecture -> flopwise's subclass with visual token dropping (flopwise_vllm.visual_drop).
VISUAL_MODELS = {
    "LlavaForConditionalGeneration": "flopwise_vllm.visual_llava:FlopwiseLlava",
    "LlavaNextForConditionalGeneration": "flopwise_vllm.visual_anyres:FlopwiseLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "flopwise_vllm.visual_anyres:FlopwiseLlavaOnevision",
    "Qwen2VLForConditionalGeneration": "flopwise_vllm.visual_qwen:FlopwiseQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "flopwise_vllm.visual_qwen:FlopwiseQwen25VL",
}
# Plugin names as declared in pyproject.toml; VLLM_PLUGINS must list them all once it is set.
PLUGIN_NAMES = ("flopwise", "flopwise_serving")

# (module, attribute path, parameters the hook relies on)
SURFACES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ()),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", ("request",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("request", "delay_free_blocks")),
    ("vllm.v1.core.sched.output", "SchedulerOutput", ("num_scheduled_tokens", "scheduled_encoder_inputs")),
    ("vllm.v1.request", "Request", ()),
    ("vllm.v1.engine", "EngineCoreOutput", ()),
    ("vllm.outputs", "RequestOutput", ()),
    (
        "vllm.entrypoints.openai.chat_completion.serving",
        "OpenAIServingChat.chat_completion_full_generator",
        ("request", "result_generator"),
    ),
    (
        "vllm.entrypoints.openai.chat_completion.serving",
        "OpenAIServingChat.chat_completion_stream_generator",
        ("request", "result_generator"),
    ),
    (
        "vllm.entrypoints.openai.completion.serving",
        "OpenAIServingCompletion.request_output_to_completion_response",
        ("final_res_batch",),
    ),
    (
        "vllm.entrypoints.openai.completion.serving",
        "OpenAIServingCompletion.completion_stream_generator",
        ("request", "engine_inputs", "result_generator"),
    ),
    ("vllm.entrypoints.serve.engine.protocol", "UsageInfo", ()),
    # visual token dropping (flopwise_vllm.visual_drop)
    (
        "vllm.multimodal.processing.processor",
        "BaseMultiModalProcessor._call_hf_processor",
        ("hf_data", "hf_kwargs"),
    ),
    (
        "vllm.multimodal.processing.processor",
        "BaseMultiModalProcessor._get_prompt_updates",
        ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
    ),
    ("vllm.model_executor.models.llava", "LlavaForConditionalGeneration.embed_multimodal", ()),
    ("vllm.model_executor.models.llava_next", "LlavaNextForConditionalGeneration._process_image_input", ()),
    (
        "vllm.model_executor.models.llava_onevision",
        "LlavaOnevisionForConditionalGeneration._process_image_input",
        ("image_input",),
    ),
    (
        "vllm.model_executor.models.llava_onevision",
        "LlavaOnevisionForConditionalGeneration._parse_and_validate_image_input",
        (),
    ),
    (
        "vllm.model_executor.models.llava_onevision",
        "LlavaOnevisionMultiModalProcessor._apply_hf_processor_main",
        ("mm_items", "hf_kwargs"),
    ),
    (
        "vllm.model_executor.models.llava_next",
        "LlavaNextForConditionalGeneration._parse_and_validate_image_input",
        (),
    ),
    (
        "vllm.model_executor.models.qwen2_vl",
        "Qwen2VLForConditionalGeneration.get_mrope_input_positions",
        ("input_tokens", "mm_features"),
    ),
    (
        "vllm.model_executor.models.qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions",
        ("input_tokens", "mm_features"),
    ),
    ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration._process_image_input", ()),
    ("vllm.multimodal.processing.processor", "BaseMultiModalProcessor.apply", ("inputs", "timing_ctx")),
    # KV token dropping (flopwise_vllm.kv_drop)
    ("vllm.v1.attention.backends.registry", "register_backend", ("backend", "class_path")),
    (
        "vllm.v1.attention.backends.cpu_attn",
        "CPUAttentionMetadataBuilder.build",
        ("common_prefix_len", "common_attn_metadata"),
    ),
    (
        "vllm.v1.attention.backends.cpu_attn",
        "CPUAttentionBackendImpl.forward",
        ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
    ),
    (
        "vllm.v1.attention.backend",
        "CommonAttentionMetadata",
        ("block_table_tensor", "seq_lens", "query_start_loc_cpu"),
    ),
    (
        "vllm._custom_ops",
        "cpu_attn_reshape_and_cache",
        ("key", "value", "key_cache", "value_cache", "slot_mapping"),
    ),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", ()),
    ("vllm.v1.worker.gpu_worker", "Worker.execute_model", ("scheduler_output",)),
    # seeded sampling and self heads (flopwise_vllm.seeded, flopwise_vllm.self_values)
    ("vllm.v1.worker.gpu_worker", "Worker.sample_tokens", ("grammar_output",)),
    ("vllm.v1.worker.gpu_model_runner", "ExecuteModelState", ("scheduler_output", "sample_hidden_states")),
    ("vllm.v1.core.sched.output", "SchedulerOutput", ("finished_req_ids", "preempted_req_ids")),
    (
        "vllm.v1.core.single_type_kv_cache_manager",
        "SingleTypeKVCacheManager._remove_blocks_in_range",
        ("request_id", "first_block", "last_block"),
    ),
    ("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block", ("block",)),
    ("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", ("num_blocks",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler._get_local_prefix_cache_hit", ("request",)),
    (
        "vllm.v1.core.kv_cache_manager",
        "KVCacheManager.truncate_computed_blocks",
        ("blocks", "num_computed_tokens"),
    ),
    (
        "vllm.v1.attention.backends.cpu_attn",
        "_get_attn_isa",
        ("dtype", "block_size", "head_size", "kv_cache_dtype"),
    ),
)

_registered = False
_checked = False


class SurfaceError(RuntimeError):
    pass


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_surfaces() -> None:
    """Raise :class:`SurfaceError` naming the first vLLM surface flopwise needs that is missing."""
    global _checked
    if _checked:
        return
    version = _vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise SurfaceError(f"flopwise supports vLLM {SUPPORTED_VLLM}, found {version}")
    for module_name, path, params in SURFACES:
        where = f"{module_name}.{path}"
        try:
            obj = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise SurfaceError(
                f"vLLM surface {where} is missing ({e}); flopwise needs vLLM {SUPPORTED_VLLM}"
            ) from None
        if params:
            if inspect.isclass(obj):
                names = set(getattr(obj, "__dataclass_fields__", {})) | set(
                    getattr(obj, "__struct_fields__", ())
                )
                names |= set(inspect.signature(obj).parameters)
            else:
                names = set(inspect.signature(obj).parameters)
            missing = [p for p in params if p not in names]
            if missing:
                raise SurfaceError(
                    f"vLLM surface {where} lacks {missing}; flopwise needs vLLM {SUPPORTED_VLLM}"
                )
    _checked = True


def register() -> None:
    """``vllm.general_plugins`` entry point: runs in every vLLM process, once per process."""
    global _registered
    if _registered:
        return
    check_surfaces()
    from flopwise.hw import allow_amx

    allow_amx()  # before any kernel of this process runs: vLLM's bf16 attention uses AMX without asking
    from flopwise_vllm.options import server_defaults

    server_defaults()  # a malformed FLOPWISE_DEFAULTS stops every vLLM process at start-up, naming the field
    from vllm import ModelRegistry

    # Visual token dropping: LLaVA / Qwen2-VL subclasses (stock behaviour at visual_keep 1), by
    # "module:Class" string so nothing heavy is imported until vLLM loads one of these models.
    for arch, cls in VISUAL_MODELS.items():
        ModelRegistry.register_model(arch, cls)
    # KV token dropping: CPU attention that can read only a request's kept positions (stock with no drop
    # in flight). The worker that feeds it is set by the platform plugin (flopwise_vllm.platform).
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, KV_BACKEND_CLS)
    _registered = True
    logger.debug("flopwise plugin registered (vLLM %s)", _vllm_version())
