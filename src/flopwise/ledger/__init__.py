"""The FLOP ledger: one analytic cost model, read from a HF ``config.json``, used everywhere.

The vLLM scheduler charges each step with it, the server reports it as ``usage.flops``, budgets are
enforced against it, and ``flopwise flops`` prints it. See :mod:`flopwise.ledger.cost` for the
counting convention.
"""

from flopwise.ledger.cost import COMPONENTS, Breakdown, FlopModel, RequestCost, context_sum
from flopwise.ledger.spec import (
    SUPPORTED,
    LedgerError,
    ModelSpec,
    UnsupportedArchitecture,
    load_config,
    parse_spec,
)

__all__ = [
    "COMPONENTS",
    "SUPPORTED",
    "Breakdown",
    "FlopModel",
    "LedgerError",
    "ModelSpec",
    "RequestCost",
    "UnsupportedArchitecture",
    "context_sum",
    "load_config",
    "parse_spec",
]
