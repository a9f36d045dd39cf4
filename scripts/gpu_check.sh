#!/usr/bin/env bash
# The GPU check, in one command on a machine with a CUDA GPU (`make gpu-check`):
#   1. installs the gpu extra (CUDA vLLM, the pinned stack of constraints/gpu.txt) into .venv;
#   2. runs the tests marked `gpu` (skipped everywhere else);
#   3. builds the tiny teacher and runs generate and drift with engine.gpus_per_actor=1;
#   4. runs the benchmark with one engine per GPU: pipeline / bare vLLM (its default engine core
#      process), and the same prompts through ray.data.llm's processor; prints the ratios.
# Everything it writes goes under $OUT (default outputs/gpu-check); the log is $OUT/gpu-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu-check}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || { echo "gpu-check: no nvidia-smi: this check needs a CUDA GPU" >&2; exit 2; }
COUSINS_EXTRAS=gpu,test bash scripts/setup.sh
py=.venv/bin/python
$py -c "import torch, vllm; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__, torch.cuda.get_device_name(0))"

echo "== tests marked gpu"
$py -m pytest -m gpu -q -p no:cacheprovider
gpu=(engine.gpus_per_actor=1 engine.kv_cache_gib=${KV_CACHE_GIB:-4} engine.enforce_eager=false)
echo "== generate"
$py jobs/generate.py "${gpu[@]}" storage.root="$out/runs" run.run_id=gpu-generate
echo "== drift"
$py jobs/drift.py "${gpu[@]}" storage.root="$out/runs" run.run_id=gpu-drift
echo "== benchmark"
$py jobs/benchmark.py "${gpu[@]}" storage.root="$out/bench" bench.out="$out/benchmark.json" \
  bench.prompts=${PROMPTS:-512} bench.repeats=${REPEATS:-3} bench.two_node=false bench.ray_data_llm=true \
  engine.batch_size=${BATCH_SIZE:-256} engine.max_num_seqs=${MAX_NUM_SEQS:-256}
echo "gpu-check: done; result $out/benchmark.json, log $out/gpu-check.log"
