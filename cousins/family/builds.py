"""The models the project builds, by recipe: `ensure_model` builds the one a config names (the tiny
teacher of cousins/family/models.py, the Qwen-shaped realistic teacher of cousins/family/realistic.py)
unless a current build is there. Dispatching here keeps models.py and realistic.py out of each
other's imports."""

from __future__ import annotations

import os
from pathlib import Path

from cousins.contract.recipes import REALISTIC_TEACHER
from cousins.family import models, realistic


def is_current(path: str | os.PathLike, recipe_name: str, seed: int = 0) -> bool:
    """Whether `path` holds a complete build of `recipe_name` as the code builds it now: the same
    recipe fields and the same lessons."""
    if recipe_name == REALISTIC_TEACHER:
        return realistic.is_current(path, realistic.recipe(recipe_name, seed))
    return models.is_current(path, recipe_name, seed)


def ensure_model(path: str, recipe_name: str | None, seed: int = 0, *, setting: str = "model.path") -> bool:
    """Build the model at `path` from its recipe unless a current build is there (is_current: a
    build of an older recipe or of other lessons is replaced). True when it built.

    A build goes to a temporary directory and is renamed into place, so a killed build leaves
    nothing that looks complete; a directory the project did not build is refused (NotOurs).
    """
    if recipe_name is None:
        from cousins.contract.refs import is_gguf, kind

        if kind(path) == "local" and not is_gguf(path) and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"model directory not found: {path!r} has no config.json (set model.path)")
        return False
    def current() -> bool:
        return is_current(path, recipe_name, seed)

    if current():
        return False
    models.check_ours(path, setting=setting)
    if models.read_build(path) is not None:
        print(f"{path} was built from another recipe or other lessons: building {recipe_name!r} again", flush=True)
    if recipe_name == REALISTIC_TEACHER:
        r = realistic.recipe(recipe_name, seed)
        return models.replace_build(path, lambda tmp: realistic.build(tmp, r), setting=setting, current=current)
    r = models.tiny_recipe(recipe_name, seed)
    return models.replace_build(path, lambda tmp: models.build_tiny_llama(tmp, r), setting=setting, current=current)
