"""cousins: teacher generation and behaviour-drift measurement on Ray + vLLM."""

__version__ = "0.1.0"
