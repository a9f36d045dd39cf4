"""A run's life and where it lives: storage, the run layout and reading its stages, the ledger, progress, the corpus, Ray."""
