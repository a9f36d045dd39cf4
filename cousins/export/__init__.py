"""Distillation-ready data from a committed run: SFT chats, optionally with the top-k logprobs."""
