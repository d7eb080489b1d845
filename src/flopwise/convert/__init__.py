"""Offline checkpoint transforms whose output stock vLLM and transformers load with no flopwise code.

One transform per file (``sqa.py``: fewer query heads; ``moe.py``: fewer experts / lower top-k), each a
config dataclass plus plain-torch functions; ``io.py`` holds what they share (loading, atomic output,
the JSON report).
"""

from flopwise.convert.io import ConvertError

__all__ = ["ConvertError"]
