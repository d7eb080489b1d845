"""What this processor is, and the engine settings that follow from it.

The dtype follows the CPU: bf16 only with native bf16 instructions (AVX512-BF16 or AMX), float32
everywhere else (emulated bf16 is 3-7x slower). Every benchmark names what this module reports.
"""

from __future__ import annotations

import os
import platform


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_dtype() -> str:
    """``bfloat16`` where the CPU computes it natively, else ``float32``."""
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def allow_amx() -> bool:
    """Ask Linux for this process's AMX tile state (a no-op where the CPU has none).

    vLLM's CPU attention runs AMX instructions in bf16 without asking; a process whose first AMX
    instruction is its own (a one-token prompt: no oneDNN matmul has asked first) dies of SIGILL.
    """
    if "amx_tile" not in cpu_flags():
        return False
    import torch

    return bool(torch._C._cpu._init_amx())


def describe() -> str:
    """One line naming the hardware and dtype, for benchmark reports."""
    return f"{cpu_name()}, {os.cpu_count()} cores, dtype {default_dtype()}"


def engine_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a vLLM CPU engine: a small KV cache unless set, and no core kept back on small
    machines."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if (os.cpu_count() or 1) <= 4:
        # By default vLLM keeps one core for the front end; on 2 cores that halves the model's share.
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env
