# The two commands of the README. Both set up .venv first (idempotent, quick when done).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: tiny teacher (built if absent), demo corpus, local Ray, ./outputs.
demo: setup
	.venv/bin/python jobs/generate.py $(ARGS)

# The test suite.
test: setup
	.venv/bin/python -m pytest $(ARGS)
