import os
import re
import urllib.request

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


MAX_BUDGET = 10**12  # the shared flopwise server's --max-flop-budget


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """``flopwise serve`` on the tiny Llama, shared by the modules that talk to one (each server start costs
    half a minute here)."""
    from flopwise.ledger import FlopModel
    from flopwise_serve.launch import flopwise_server, free_port

    path = tiny_model("llama-gqa")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with flopwise_server(
        path, free_port(), log, ["--max-model-len", "1024", "--max-flop-budget", str(MAX_BUDGET)]
    ) as s:
        yield s, FlopModel.from_pretrained(path)


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """Plain ``vllm serve`` on the tiny Llama with flopwise installed and no other step, shared likewise."""
    from flopwise.ledger import FlopModel
    from flopwise_serve.launch import free_port, vllm_serve

    path = tiny_model("llama-gqa")
    log = tmp_path_factory.mktemp("vllm") / "vllm-serve.log"
    with vllm_serve(path, free_port(), log, ["--max-model-len", "1024"]) as s:
        yield s, FlopModel.from_pretrained(path), path


def gauge(url: str, name: str) -> float:
    """A gauge off a server's /metrics (the first engine's, where there are several)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
