"""The package's architecture, checked: subpackages that import one another in one direction only,
no module over 400 lines, no private name used outside its module, and nothing else flat in
cousins/ but the console script."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "cousins"
MAX_LINES = 400
FLAT = {"__init__", "cli"}  # the package's own modules outside any folder
# The folders, bottom first: each may import only the ones before it (docs/architecture.md, "Layout").
LAYERS = ["contract", "run", "drift", "engine", "family", "query", "export", "orchestrate", "audit", "bench"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: pathlib.Path, name: str) -> list[tuple[str, list[str]]]:
    """(module imported from, names imported) of every import of a cousins module in `path`,
    function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cousins"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("cousins")]
    return out


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else None


def test_nothing_flat_but_the_console_script():
    flat = {p.stem for p in ROOT.glob("*.py")}
    assert flat == FLAT, f"modules outside a folder: {sorted(flat - FLAT)}"


def test_no_module_over_400_lines():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_folders_import_only_the_layers_below_them():
    """A module of a folder imports from its own folder and from folders earlier in LAYERS only:
    no import from a folder back up into one that imports it (function-level imports included)."""
    modules = _modules()
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), f"folders not in LAYERS (or gone): {sorted(folders ^ set(LAYERS))}"
    upward = []
    for name, path in modules.items():
        src = _folder(name)
        if src is None:
            continue
        for target, names in _imports(path, name):
            for t in [target] + [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]:
                dst = _folder(t)
                if dst and dst != src and LAYERS.index(dst) > LAYERS.index(src):
                    upward.append(f"{name} ({src}) imports {t} ({dst})")
    assert not upward, "imports up the layers:\n" + "\n".join(sorted(set(upward)))


def test_no_private_name_used_across_modules():
    """`from cousins.x import _y` and `x._y` on an imported cousins module are both a reach into
    another module's privates."""
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cousins"):
                for a in node.names:
                    if a.name.startswith("_") and a.name != "__version__":
                        found.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in _modules():
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("cousins") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                found.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_every_import_of_the_package_resolves():
    """Imports inside functions run only when the function does: each one, in the package, the
    jobs, the services and the tests, must name a module and a name that exist."""
    import importlib

    bad = []
    for top in ("cousins", "jobs", "services", "tests"):
        for path in sorted((ROOT.parent / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cousins"):
                    try:
                        module = importlib.import_module(node.module)
                    except ImportError as e:
                        bad.append(f"{path.name}:{node.lineno} {node.module}: {e}")
                        continue
                    for a in node.names:
                        if not hasattr(module, a.name):
                            try:
                                importlib.import_module(f"{node.module}.{a.name}")
                            except ImportError:
                                bad.append(f"{path.name}:{node.lineno} {node.module} has no {a.name}")
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith("cousins"):
                            try:
                                importlib.import_module(a.name)
                            except ImportError as e:
                                bad.append(f"{path.name}:{node.lineno} {a.name}: {e}")
    assert not bad, "imports that do not resolve:\n" + "\n".join(bad)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of a graph (module -> modules it imports), each once, smallest first."""
    found, seen = [], set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:  # each circle from its smallest module only
                walk(nxt, path + [nxt])

    for start in sorted(edges):
        walk(start, [start])
    return sorted(found, key=len)


def test_no_import_circles_between_the_modules_of_one_folder():
    """Within a folder too, imports go one way (function-level imports included): a circle means
    two modules that cannot be read, tested or moved apart."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        folder = _folder(name)
        if folder is None or name == f"cousins.{folder}":
            continue
        for target, names in _imports(path, name):
            for t in [target] + [f"{target}.{n}" for n in names]:
                if t in modules and t != name and _folder(t) == folder and t != f"cousins.{folder}":
                    edges.setdefault(name, set()).add(t)
    circles = _circles(edges)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_a_planted_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
