"""The data contract: every table and JSON file a run holds, the typed config, the names and recipes."""
