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

from flopwise.budget import FIELD, BudgetError, parse_budget
from flopwise.ledger import FlopModel, LedgerError
from flopwise.techniques import kv_drop as kd

logger = logging.getLogger("flopwise")
PLATFORM_CLS = "flopwise_vllm.platform.FlopwiseCpuPlatform"
STOCK_CPU = "vllm.platforms.cpu.CpuPlatform"
OPT_OUT_ENV = "FLOPWISE_SCHEDULER"
MAX_BUDGET_ENV = "FLOPWISE_MAX_FLOP_BUDGET"


def cpu_platform() -> str | None:
    """Activate exactly where vLLM's own CPU platform would, and only for the plain CPU platform."""
    if os.environ.get(OPT_OUT_ENV) == "0":
        return None
    from vllm.platforms import cpu_platform_plugin

    return PLATFORM_CLS if cpu_platform_plugin() == STOCK_CPU else None


def max_budget() -> float | None:
    raw = os.environ.get(MAX_BUDGET_ENV)
    return float(raw) if raw else None


class FlopwiseCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from flopwise_vllm import SCHEDULER_CLS

        sched, model = vllm_config.scheduler_config, vllm_config.model_config
        if sched.scheduler_cls is None and model is not None and getattr(model, "runner_type", "generate") == "generate":
            try:
                FlopModel.from_pretrained(model.hf_config.to_dict())
                sched.scheduler_cls = SCHEDULER_CLS
            except LedgerError as e:
                logger.warning("flopwise: %s; serving without FLOP charging or budgets", e)
        if sched.scheduler_cls == SCHEDULER_CLS:
            from flopwise_vllm.kv import STOCK_WORKER, WORKER_CLS

            parallel = vllm_config.parallel_config
            if parallel.worker_cls == STOCK_WORKER:  # KV dropping: the worker tells attention each step's drops
                parallel.worker_cls = WORKER_CLS

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        super().validate_request(processed_inputs, params)
        extra = getattr(params, "extra_args", None)
        if extra and FIELD in extra:
            try:
                parse_budget(extra[FIELD], max_budget())
            except BudgetError as e:
                raise VLLMValidationError(str(e), parameter=FIELD, value=extra[FIELD]) from None
        if extra and any(name in extra for name in kd.FIELDS):
            try:
                kd.from_extra(extra)
            except kd.KVDropError as e:
                raise VLLMValidationError(f"vllm_xargs: {e}", parameter=e.field, value=extra.get(e.field)) from None
        if extra and "early_rejection" in extra:
            from flopwise.prm import resolve
            from flopwise_vllm.rejection import parse_config

            try:
                resolve(parse_config(extra["early_rejection"]).prm)
            except ValueError as e:  # ConfigError and PRMError name the field; bad JSON is a ValueError too
                raise VLLMValidationError(f"vllm_xargs: {e}", parameter="early_rejection",
                                          value=extra["early_rejection"]) from None
