import os

import pytest

# Engines in tests: small KV cache, all cores for the model, engine in-process where a test builds LLM().
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family)`` -> directory of a random tiny model of that family (built once per session)."""
    from flopwise.hf.tiny import build

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = build(family, str(root / family))
        return built[family]

    return get
