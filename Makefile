# The two commands of the README. Both set up .venv first (idempotent, quick when done): the demo
# and drift the runtime only; the tests add the test tools, Chromium and llm-compressor's venv.
.PHONY: setup setup-test demo drift test gpu-check

setup:
	@bash scripts/setup.sh

setup-test:
	@COUSINS_EXTRAS=$${COUSINS_EXTRAS:-cpu,test} bash scripts/setup.sh

# The main job on the embedded default: tiny teacher (built if absent), demo corpus, local Ray, ./outputs.
demo: setup
	.venv/bin/python jobs/generate.py $(ARGS)

# Behaviour drift on the embedded default: the tiny teacher against its quantized and distilled
# cousins (built offline on first use) and the noise floor; commits drift rows, summary.json, report.html.
drift: setup
	.venv/bin/python jobs/drift.py $(ARGS)

# The test suite, in TEST_WORKERS processes (pytest-xdist), each taking a whole test file at a
# time (a file's Ray, servers and engines stay in one process). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup-test
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# On a machine with a CUDA GPU: install the gpu extra, run the gpu tests, generate, drift and the
# benchmark (against bare vLLM and ray.data.llm) on GPU engines; prints the ratios.
gpu-check:
	bash scripts/gpu_check.sh
