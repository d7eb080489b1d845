"""The plugin spine: entry points, vLLM's own loader, idempotent register, surface checks."""

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

import flopwise_vllm
from flopwise_serve.cli import serve_command


def test_entry_points_are_declared():
    general = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    endpoint = {e.name: e.value for e in md.entry_points(group="vllm.endpoint_plugins")}
    assert general["flopwise"] == "flopwise_vllm:register"
    assert endpoint["flopwise_serving"] == "flopwise_vllm.endpoint:FlopwiseEndpointPlugin"
    assert set(flopwise_vllm.PLUGIN_NAMES) == {"flopwise", "flopwise_serving"}


def test_vllm_loads_the_plugin_with_no_other_step():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "import flopwise_vllm; print('registered', flopwise_vllm._registered)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered True" in out.stdout


def test_register_is_idempotent():
    flopwise_vllm.register()
    flopwise_vllm.register()
    assert flopwise_vllm._registered


def test_missing_surface_is_named(monkeypatch):
    monkeypatch.setattr(flopwise_vllm, "_checked", False)
    monkeypatch.setattr(flopwise_vllm, "SURFACES", flopwise_vllm.SURFACES + (
        ("vllm.v1.core.sched.scheduler", "Scheduler.flopwise_missing_hook", ()),))
    with pytest.raises(flopwise_vllm.SurfaceError, match=r"Scheduler\.flopwise_missing_hook"):
        flopwise_vllm.check_surfaces()


def test_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(flopwise_vllm, "_checked", False)
    monkeypatch.setattr(flopwise_vllm, "SURFACES", (
        ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("request", "no_such_param")),))
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
