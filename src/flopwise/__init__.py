"""flopwise: FLOP-aware inference middleware for vLLM (engine-agnostic core; no vLLM import here)."""

__version__ = "0.1.0"
