"""The plugin spine: entry points, vLLM's own loader, idempotent register, surface checks."""

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

import flopwise_vllm
from flopwise_serve.serve import serve_command


def test_entry_points_are_declared():
    general = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    endpoint = {e.name: e.value for e in md.entry_points(group="vllm.endpoint_plugins")}
    assert general["flopwise"] == "flopwise_vllm:register"
    assert endpoint["flopwise_serving"] == "flopwise_vllm.endpoint:FlopwiseEndpointPlugin"
    assert set(flopwise_vllm.PLUGIN_NAMES) == {"flopwise", "flopwise_serving"}


def test_vllm_loads_the_plugin_with_no_other_step():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "import flopwise_vllm; print('registered', flopwise_vllm._registered)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered True" in out.stdout


def test_register_puts_flopwise_in_vllms_registries_once(monkeypatch):
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    flopwise_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == flopwise_vllm.KV_BACKEND_CLS
    for arch, target in flopwise_vllm.VISUAL_MODELS.items():
        entry = ModelRegistry.models[arch]
        assert f"{entry.module_name}:{entry.class_name}" == target

    # A second call (vLLM runs it in every process, sometimes more than once) does no work again.
    def boom():
        raise AssertionError("register() re-ran its start-up checks")

    monkeypatch.setattr(flopwise_vllm, "check_surfaces", boom)
    flopwise_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == flopwise_vllm.KV_BACKEND_CLS


def test_missing_surface_is_named(monkeypatch):
    monkeypatch.setattr(flopwise_vllm, "_checked", False)
    monkeypatch.setattr(
        flopwise_vllm,
        "SURFACES",
        flopwise_vllm.SURFACES + (("vllm.v1.core.sched.scheduler", "Scheduler.flopwise_missing_hook", ()),),
    )
    with pytest.raises(flopwise_vllm.SurfaceError, match=r"Scheduler\.flopwise_missing_hook"):
        flopwise_vllm.check_surfaces()


def test_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(flopwise_vllm, "_checked", False)
    monkeypatch.setattr(
        flopwise_vllm,
        "SURFACES",
        (("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("request", "no_such_param")),),
    )
    with pytest.raises(flopwise_vllm.SurfaceError, match="no_such_param"):
        flopwise_vllm.check_surfaces()


def test_wrong_vllm_version_is_named(monkeypatch):
    monkeypatch.setattr(flopwise_vllm, "_checked", False)
    monkeypatch.setattr(flopwise_vllm, "SUPPORTED_VLLM", "9.9.9")
    with pytest.raises(flopwise_vllm.SurfaceError, match="9.9.9"):
        flopwise_vllm.check_surfaces()


def test_serve_command_wires_flopwise_in_and_keeps_user_choices(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    argv, env = serve_command("/m", ["--dtype", "float32", "--max-model-len", "512"], port=9001)
    assert argv[argv.index("--scheduler-cls") + 1] == flopwise_vllm.SCHEDULER_CLS
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9001"
    assert env["VLLM_PLUGINS"].split(",") == ["other", "flopwise", "flopwise_serving"]
    assert "--enforce-eager" in argv


def test_activation_on_a_non_cpu_platform_keeps_the_scheduler_and_refuses_kv(tiny_model, tmp_path):
    """What a GPU platform would do (no flopwise KV worker there): charging and budgets on, KV dropping and
    self heads a 400."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig

    from flopwise.prm import self_head
    from flopwise.techniques import OptionError
    from flopwise_vllm import options
    from flopwise_vllm.platform import activate

    path = tiny_model("llama-gqa")
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None),
        model_config=SimpleNamespace(
            runner_type="generate",
            hf_config=AutoConfig.from_pretrained(path),
            logprobs_mode="processed_logits",
        ),
        parallel_config=SimpleNamespace(worker_cls="vllm.v1.worker.gpu_worker.Worker"),
        cache_config=SimpleNamespace(cache_dtype="auto"),
    )
    try:
        activate(config, kv_worker=None)
        assert config.scheduler_config.scheduler_cls == flopwise_vllm.SCHEDULER_CLS
        # left as vLLM chose it
        assert config.parallel_config.worker_cls == "vllm.v1.worker.gpu_worker.Worker"
        opts, extra = options.prepare({"flop_budget": 1e12}, 1, [{"prompt_token_ids": [1, 2, 3]}])
        assert extra == {"flop_budget": 1e12}
        with pytest.raises(OptionError, match="KV dropping is not available here") as e:
            options.prepare({"kv_keep": 0.25}, 1, paths={"kv_keep": "vllm_xargs.kv_keep"})
        assert e.value.field == "vllm_xargs.kv_keep"
        hf = config.model_config.hf_config
        head = self_head.save(
            tmp_path / "head", hf.architectures[0], hf.hidden_size, torch.ones(hf.hidden_size), torch.zeros(1)
        )
        own = {"early_rejection": {"prm": f"self:{head}"}}
        with pytest.raises(OptionError, match="flopwise's CPU worker") as e:
            options.prepare(own, 4)
        assert e.value.field == "early_rejection.prm"
        # The CPU platform passes its worker: KV dropping is accepted there.
        config.scheduler_config.scheduler_cls = None
        config.parallel_config.worker_cls = "vllm.v1.worker.cpu_worker.CPUWorker"
        from flopwise_vllm.kv_drop import WORKER_CLS

        activate(config, kv_worker=WORKER_CLS)
        assert config.parallel_config.worker_cls == WORKER_CLS
        assert options.prepare({"kv_keep": 0.25}, 1)[0].kv.keep == 0.25
        # the confidence scorer needs the raw logprobs this engine's sampler does not return
        bad = {"early_rejection": {"prm": "confidence"}}
        with pytest.raises(OptionError, match="processed_logits") as e:
            options.prepare(bad, 4, paths={"early_rejection": "vllm_xargs.early_rejection"})
        assert e.value.field == "vllm_xargs.early_rejection.prm"
        assert options.prepare({"early_rejection": {"prm": "verifier:arithmetic"}}, 4)[0].early_rejection
        # a self head runs on flopwise's worker, on the model it was fitted on only
        assert options.prepare(own, 4)[0].early_rejection.prm == f"self:{head}"
        other = self_head.save(tmp_path / "other", "Qwen2ForCausalLM", 8, torch.ones(8), torch.zeros(1))
        with pytest.raises(OptionError, match="Qwen2ForCausalLM with hidden size 8") as e:
            options.prepare(
                {"early_rejection": {"prm": f"self:{other}"}},
                4,
                paths={"early_rejection": "vllm_xargs.early_rejection"},
            )
        assert e.value.field == "vllm_xargs.early_rejection.prm"
    finally:
        options.set_served(None, None)


def test_malformed_server_defaults_stop_vllm_at_start_up(monkeypatch):
    """register() runs in every vLLM process at start-up: a malformed FLOPWISE_DEFAULTS stops it there."""
    monkeypatch.setenv("FLOPWISE_DEFAULTS", '{"kv_keep": 2}')
    monkeypatch.setattr(flopwise_vllm, "_registered", False)
    with pytest.raises(RuntimeError, match="FLOPWISE_DEFAULTS: kv_keep") as e:
        flopwise_vllm.register()
    assert "(0, 1]" in str(e.value) and not flopwise_vllm._registered
