"""``vllm.platform_plugins`` entry: vLLM's CPU platform, plus flopwise's scheduler as the default.

This is how plain ``vllm serve`` gets FLOP charging and budgets with no flag: vLLM asks platform
plugins which platform to use, and this one answers with a subclass of the CPU platform it would have
picked anyway. The subclass changes two things:

* ``check_and_update_config``: when no ``--scheduler-cls`` was given, the model is a generator and the
  ledger can cost its architecture, the scheduler becomes :class:`flopwise_vllm.scheduler.FlopwiseScheduler`
  (and, unless ``--worker-cls`` was given, the worker :class:`flopwise_vllm.kv.FlopwiseCPUWorker`).
  An architecture the ledger does not know is served exactly as stock vLLM would, with a warning.
* ``validate_request``: a malformed ``flop_budget``, ``early_rejection`` (a JSON string) or KV-dropping
  option (``kv_policy``, ``kv_keep``, ``kv_keep_tokens``) in ``vllm_xargs`` is refused in the front end.

Opt out with ``FLOPWISE_SCHEDULER=0`` (or ``VLLM_TARGET_DEVICE=cpu``, which makes vLLM skip platform
plugins).
"""

from __future__ import annotations

import logging
import os

from vllm.exceptions import VLLMValidationError
from vllm.platforms.cpu import CpuPlatform

from flopwise.ledger import FlopModel, LedgerError
from flopwise.options import FIELDS
from flopwise.techniques import OptionError
from flopwise_vllm import options

logger = logging.getLogger("flopwise")
PLATFORM_CLS = "flopwise_vllm.platform.FlopwiseCpuPlatform"
STOCK_CPU = "vllm.platforms.cpu.CpuPlatform"
OPT_OUT_ENV = "FLOPWISE_SCHEDULER"


def cpu_platform() -> str | None:
    """Activate exactly where vLLM's own CPU platform would, and only for the plain CPU platform."""
    if os.environ.get(OPT_OUT_ENV) == "0":
        return None
    from vllm.platforms import cpu_platform_plugin

    return PLATFORM_CLS if cpu_platform_plugin() == STOCK_CPU else None


def validate(engine_input, params) -> None:
    """Every request, whatever endpoint or API brought it: flopwise's options validated, the server defaults
    applied, admission against its budget; written back to ``params.extra_args`` in canonical form."""
    if params is None or not hasattr(params, "extra_args") or not hasattr(params, "n"):
        return  # pooling requests: nothing flopwise charges
    extra = params.extra_args or {}
    try:
        _, params.extra_args = options.prepare(extra, params.n, [engine_input], paths=_XARGS)
    except OptionError as e:
        raise VLLMValidationError(
            str(e), parameter=e.field, value=extra.get(e.field.split(".")[-1])
        ) from None


_XARGS = {name: f"vllm_xargs.{name}" for name in FIELDS}


def activate(vllm_config, kv_worker: str | None = None) -> None:
    """flopwise's scheduler where vLLM would run its own (a generator the ledger can cost, no
    ``--scheduler-cls``), and ``kv_worker`` (flopwise's CPU worker, which feeds its attention backend) where
    vLLM would run its stock CPU worker; records the served model's ledger for admission in this process
    (the front end's). The scheduler-side techniques need nothing platform-specific, so this runs on any
    platform; KV dropping needs that worker, and requests asking for it elsewhere get a 400
    (:func:`flopwise_vllm.options.prepare`)."""
    from flopwise_vllm import SCHEDULER_CLS
    from flopwise_vllm.kv_drop import STOCK_WORKER, WORKER_CLS, kv_supported, runs_worker

    sched, model = vllm_config.scheduler_config, vllm_config.model_config
    if model is None or getattr(model, "runner_type", "generate") != "generate":
        return
    try:
        ledger = FlopModel.from_pretrained(model.hf_config.to_dict())
    except LedgerError as e:
        logger.warning("flopwise: %s; serving without FLOP charging or budgets", e)
        return
    if sched.scheduler_cls is None:
        sched.scheduler_cls = SCHEDULER_CLS
    if sched.scheduler_cls == SCHEDULER_CLS and kv_worker is not None:
        parallel = vllm_config.parallel_config
        if parallel.worker_cls in (
            STOCK_WORKER,
            "auto",
        ):  # KV dropping: the worker tells attention each step's drops
            parallel.worker_cls = kv_worker
    worker = kv_worker == WORKER_CLS and runs_worker(vllm_config)
    options.set_served(
        ledger,
        kv_supported(vllm_config, ledger) and worker,
        vllm_config.model_config.logprobs_mode,
        worker,
    )


class FlopwiseCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from flopwise_vllm.kv_drop import WORKER_CLS

        activate(vllm_config, WORKER_CLS)

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        super().validate_request(processed_inputs, params)
        validate(processed_inputs, params)
