"""The vLLM boundary: engine specs and placement, checkpoints and formats, prompt templates, the engine actors and their feeder."""
