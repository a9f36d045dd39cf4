"""The stages composed into runs: prompts, generate, score, exact KLD, the diff; jobs, submission and the manifest."""
