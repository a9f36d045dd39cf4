"""Reading committed runs: the one backend of `cousins query` and of the query service."""
