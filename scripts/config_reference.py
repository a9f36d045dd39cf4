"""Write docs/reference/config.md, every config key, from the typed config itself: each dataclass
field's dotted key, type, default and the comments written beside it in the source
(cousins/contract/config.py, endpoint_config.py, audit_config.py, cousins/export/config.py). A test checks the committed page equals
what this writes, so the reference cannot drift from the code.

    .venv/bin/python scripts/config_reference.py          # rewrite the page
    .venv/bin/python scripts/config_reference.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "config.md"


def _fields(module) -> dict[tuple[str, str], tuple[str, str]]:
    """(class, field) -> (its annotation, the comment lines right above it and beside it)."""
    src = inspect.getsource(module)
    lines = src.splitlines()
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for cls in ast.parse(src).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, n = [], stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, by_line.get(n, ""))
                n -= 1
            beside = [by_line[k] for k in range(stmt.lineno, stmt.end_lineno + 1) if k in by_line]
            out[(cls.name, stmt.target.id)] = (ast.unparse(stmt.annotation), " ".join([*above, *beside]).strip())
    return out


def _default(f: dataclasses.Field):
    from omegaconf import MISSING

    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "required"
    if v is MISSING:
        return "required"
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(cls, prefix: str, fields: dict) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(probe := f.default_factory()):
            out += rows(type(probe), f"{key}.", fields)
            continue
        typ, note = fields.get((_owner(cls, f.name), f.name), ("", ""))
        out.append(f"| `{key}` | `{_cell(typ)}` | `{_cell(_default(f))}` | {_cell(note)} |")
    return out


def _owner(cls, name: str) -> str:
    """The class in cls's MRO that declares field `name` (a subclass inherits its fields)."""
    for base in cls.__mro__:
        if name in getattr(base, "__annotations__", {}):
            return base.__name__
    return cls.__name__


HEADER = "| key | type | default | what |\n|---|---|---|---|"


def page() -> str:
    from cousins.contract import audit_config as A
    from cousins.contract import config as C
    from cousins.contract import endpoint_config as EC
    from cousins.export import config as E

    fields = {**_fields(C), **_fields(EC), **_fields(A), **_fields(E)}
    sections = [
        ("Generation and drift jobs (`jobs/generate.py`, `jobs/drift.py`)",
         "The keys of `Config`. The YAML files in `conf/` choose named alternatives (`model=…`, `corpus=…`, "
         "`cousins=…`) whose values override these defaults.", rows(C.Config, "", fields)),
        ("A cousin (`cousins.NAME.…`)",
         "Each entry of `cousins`: a checkpoint, an adapter or the original's weights with another "
         "quantization or dtype; `docs/models.md` says how each form is read.",
         rows(C.CousinConfig, "cousins.NAME.", fields)),
        ("A model behind an endpoint (`model.endpoint.…`, `cousins.NAME.endpoint.…`)",
         "An OpenAI-compatible server that runs the original or a cousin instead of an engine of ours "
         "(`docs/models.md`, \"A model behind an endpoint\"); set as a whole, e.g. "
         "`model.endpoint={url: http://10.0.0.5:8000/v1, model: my-model}`.",
         rows(EC.EndpointConfig, "….endpoint.", fields)),
        ("The audit (`jobs/audit.py`: the keys above, `endpoint.…` and `audit.…`)",
         "The reference is `model`, the prompts `corpus`, the sampling `run` (`conf/run/audit.yaml`: 10 "
         "samples a prompt at temperature 1); `endpoint` is the audited server, with the keys above "
         "(`docs/audit.md`).", rows(A.AuditConfig, "audit.", fields)),
        ("The benchmark (`jobs/benchmark.py`: the keys above and `bench.…`)", "",
         rows(C.BenchConfig, "bench.", fields)),
        ("Distillation exports (`jobs/export.py`)", "", rows(E.ExportConfig, "", fields)),
    ]
    out = ["# Every config key", "",
           "Generated from the typed config by `scripts/config_reference.py` (a test checks this page is "
           "current). Set a key on the command line as a Hydra override: `key=value`, `+key=value` for a "
           "key a config lacks, `~key` to drop one.", ""]
    for title, intro, body in sections:
        out += [f"## {title}", ""] + ([intro, ""] if intro else []) + [HEADER, *body, ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    text = page()
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run .venv/bin/python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
