"""Read a corpus (JSONL, Parquet or CSV; any fsspec URL) into prompt rows and error rows.

A row that cannot become a prompt is data, not a crash: it becomes an error row naming its file,
its row number and the reason. Rows in == prompts + errors (blank JSONL lines are not rows).

The parsing is pure (`parse_file`, `normalise`); `read_corpus` runs it on Ray Data, one task per file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import string
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cousins.contract import schema
from cousins.contract.config import ROW_CHECKERS, CorpusConfig, FieldsConfig
from cousins.run.storage import Location, file_infos, list_files

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant")
RAW_CHARS = 200  # how much of a bad row an error row keeps
MAX_CHARS = CorpusConfig.max_chars  # the config's default, for callers that give none
Fields = FieldsConfig  # which corpus fields hold what; `messages` wins over `prompt` when a row has both


class BadRow(ValueError):
    pass


class NoUsablePrompt(ValueError):
    """Every row of the corpus is an error row (or it has none): no engine is started for it, by
    any job; the message names the first error rows and what to fix."""


def no_usable_prompt(loc: Location, n_errors: int, first: list[dict]) -> str:
    shown = "; ".join(f"{posixpath.basename(e['source'])} row {e['source_row']}: {e['reason']}" for e in first)
    what = f"all {n_errors} of its rows are error rows (first: {shown})" if n_errors else "it has no rows"
    return (f"corpus {loc.url!r} has no usable prompt: {what}. Nothing was run or committed; fix the corpus "
            f"(or corpus.fields / corpus.format, if the prompts are there under other names) and run again")


def corpus_version(loc: Location, fmt: str = "auto") -> dict[str, Any]:
    """What the corpus is now, without reading it: its files' count, total size and a digest of
    their names, sizes and versions (mtime, or the object's ETag)."""
    digest, total, n = hashlib.sha256(), 0, 0
    infos = file_infos(loc, extensions(fmt))
    for path in sorted(infos):
        info = infos[path]
        size = int(info.get("size") or 0)
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        digest.update(json.dumps([path, size, str(version)]).encode())
        total, n = total + size, n + 1
    return {"files": n, "bytes": total, "digest": digest.hexdigest()[:16]}


def note_if_changed(loc: Location, fmt: str, recorded: dict[str, Any] | None) -> None:
    """On a resume: say so when the corpus is no longer what the run read (its prompts are kept)."""
    if not recorded:
        return  # a run from before corpus versions were recorded
    try:
        now = corpus_version(loc, fmt)
    except OSError as e:
        print(f"note: the corpus at {loc.url} cannot be listed now ({e}); the run keeps the prompts it read",
              flush=True)
        return
    if now["digest"] != recorded.get("digest"):
        print(f"note: the corpus at {loc.url} changed since this run read it ({recorded.get('files')} files, "
              f"{recorded.get('bytes')} bytes then; {now['files']} files, {now['bytes']} bytes now). The run "
              f"keeps the prompts it read then; start a new run (another run.run_id) to use the corpus as it is now",
              flush=True)


def extensions(fmt: str) -> tuple[str, ...]:
    """The file endings a corpus of format `fmt` is read from (auto: every known one)."""
    return tuple(FORMATS) if fmt == "auto" else tuple(e for e, f in FORMATS.items() if f == fmt)


def prompt_id_of(messages: list[dict]) -> str:
    """A stable content hash of the chat: the same messages give the same id on any machine."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def _optional_str(record: dict, field: str | None) -> str | None:
    if field is None:
        return None
    value = record.get(field)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    if isinstance(value, (dict, list)):
        raise BadRow(f"field {field!r} is a {type(value).__name__}, expected a string")
    return str(value)


LETTERS = string.ascii_uppercase  # the options of a multiple-choice row: A, B, …


def with_options(question: str, choices: list[str]) -> str:
    """A multiple-choice question as lm-eval-harness's MMLU prompt lists it: lettered options, then
    "Answer:"."""
    return question.rstrip() + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"


def _choices(record: dict, field: str | None) -> list[str] | None:
    raw = record.get(field) if field else None
    if raw is None or (isinstance(raw, float) and raw != raw):
        return None
    if isinstance(raw, str):  # CSV and some Parquet exports carry lists as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRow(f"field {field!r} is not a JSON list of options: {e.msg}") from None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS) or not all(isinstance(c, str) for c in raw):
        raise BadRow(f"field {field!r} must be a list of 2 to {len(LETTERS)} option strings")
    return [c for c in raw]


def _messages(record: dict, fields: Fields) -> list[dict]:
    raw = record.get(fields.messages) if fields.messages else None
    if raw is not None:
        if isinstance(raw, str):  # CSV and some Parquet exports carry chats as JSON text
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise BadRow(f"field {fields.messages!r} is not a JSON list of messages: {e.msg}") from None
        if not isinstance(raw, list) or not raw:
            raise BadRow(f"field {fields.messages!r} must be a non-empty list of {{role, content}}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRow(f"message {i} must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise BadRow(f"message {i} has role {m['role']!r}; expected one of {list(ROLES)}")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise BadRow("the last message must be a non-empty user message")
    else:
        if fields.prompt not in record:
            raise BadRow(f"no {fields.prompt!r} field; available fields: {sorted(record)}")
        prompt = record[fields.prompt]
        if not isinstance(prompt, str):
            raise BadRow(f"field {fields.prompt!r} is a {type(prompt).__name__}, expected a string")
        if not prompt.strip():
            raise BadRow(f"field {fields.prompt!r} is empty")
        messages = [{"role": "user", "content": prompt}]
    if fields.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fields.system_prompt})
    return messages


def normalise(record: Any, fields: Fields, *, source: str, source_row: int, max_chars: int = MAX_CHARS) -> dict:
    """One corpus record -> one prompt row (schema.PROMPTS). Raises BadRow with the reason."""
    if not isinstance(record, dict):
        raise BadRow(f"row is a JSON {type(record).__name__}, expected an object")
    messages = _messages(record, fields)
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise BadRow(f"prompt has {chars} characters; corpus.max_chars is {max_chars}")
    prompt_id = _optional_str(record, fields.id)
    if fields.id is not None and not prompt_id:
        raise BadRow(f"field {fields.id!r} (the id) is missing or empty")
    choices = _choices(record, fields.choices)
    checker = _optional_str(record, fields.checker)
    if checker is not None and checker not in ROW_CHECKERS:
        raise BadRow(f"field {fields.checker!r} names the answer checker {checker!r}; known: {', '.join(ROW_CHECKERS)}")
    if choices and not (fields.messages and record.get(fields.messages) is not None):
        messages[-1] = {"role": "user", "content": with_options(messages[-1]["content"], choices)}
    return {
        "prompt_id": prompt_id or prompt_id_of(messages),
        "messages": messages,
        "category": _optional_str(record, fields.category),
        "reference": _optional_str(record, fields.reference),
        "choices": choices,
        "checker": checker,
        "source": source,
        "source_row": source_row,
    }


def _error(source: str, row: int, reason: str, raw: Any) -> dict:
    if isinstance(raw, bytes):
        raw = raw[:RAW_CHARS].decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = repr(raw)
    return {"source": source, "source_row": row, "reason": reason, "raw": raw[:RAW_CHARS]}


def _records_jsonl(data: bytes, source: str):
    for i, line in enumerate(data.split(b"\n")):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, None, _error(source, i, f"not valid UTF-8 at byte {e.start}", line)
            continue
        try:
            yield i, json.loads(text), None
        except json.JSONDecodeError as e:
            yield i, None, _error(source, i, f"malformed JSON: {e.msg} at column {e.colno}", text)


def _records_csv(data: bytes, source: str):
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    for i, cells in enumerate(reader, start=1):  # row 0 is the header
        if not any(c.strip() for c in cells):
            continue
        raw = ",".join(cells)
        if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
            yield i, None, _error(source, i, "not valid UTF-8", raw.encode("utf-8", "surrogateescape"))
        elif len(cells) != len(header):
            yield i, None, _error(source, i, f"row has {len(cells)} fields, the header has {len(header)}", raw)
        else:
            yield i, dict(zip(header, cells)), None


def _records_parquet(data: bytes, source: str):
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any reader failure makes the whole file one error row
        yield 0, None, _error(source, 0, f"unreadable Parquet file: {e}", b"")
        return
    for i, record in enumerate(table.to_pylist()):
        yield i, record, None


_READERS = {"jsonl": _records_jsonl, "csv": _records_csv, "parquet": _records_parquet}


def format_of(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    for ext, name in FORMATS.items():
        if path.lower().endswith(ext):
            return name
    raise ValueError(f"cannot tell the format of {path!r} from its name; set corpus.format to one of "
                     f"{sorted(set(FORMATS.values()))}")


def parse_file(data: bytes, *, source: str, fmt: str, fields: Fields,
               max_chars: int = MAX_CHARS) -> tuple[list[dict], list[dict]]:
    """Parse one corpus file into (prompt rows, error rows)."""
    prompts, errors = [], []
    for i, record, error in _READERS[fmt](data, source):
        if error is not None:
            errors.append(error)
            continue
        try:
            prompts.append(normalise(record, fields, source=source, source_row=i, max_chars=max_chars))
        except BadRow as e:
            errors.append(_error(source, i, str(e), _excerpt(record)))
    return prompts, errors


def _excerpt(record: Any) -> str:
    """The start of a record as JSON, without serialising all of a multi-megabyte row."""
    if isinstance(record, dict):
        record = {k: (v[:RAW_CHARS] + "…" if isinstance(v, str) and len(v) > RAW_CHARS else v)
                  for k, v in record.items()}
    return json.dumps(record, default=str, ensure_ascii=False)[:RAW_CHARS]


def split_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows sharing a prompt_id: the first (by source, source_row) stays a prompt, the others
    become error rows naming where the first one is."""
    first: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["source"], r["source_row"])):
        first.setdefault(r["prompt_id"], r)
    keep = [r for r in rows if first[r["prompt_id"]] is r]
    dups = [_error(r["source"], r["source_row"],
                   f"duplicate prompt_id {r['prompt_id']!r}: first at {first[r['prompt_id']]['source']}"
                   f" row {first[r['prompt_id']]['source_row']}", _excerpt({"messages": r["messages"]}))
            for r in rows if first[r["prompt_id"]] is not r]
    return keep, dups


# --- on Ray Data ---------------------------------------------------------------------------------
# One dataset carries both kinds of row: the prompt columns plus `reason` and `raw`, which are set
# only on error rows. The caller materialises it once and splits it.

PARSED = pa.schema(list(schema.PROMPTS) + [pa.field("reason", pa.string()), pa.field("raw", pa.string())])


def _parse_batch(batch: dict, *, fmt: str, fields: Fields, max_chars: int) -> pa.Table:
    rows = []
    for data, path in zip(batch["bytes"], batch["path"]):
        prompts, errors = parse_file(data, source=path, fmt=format_of(path, fmt), fields=fields, max_chars=max_chars)
        rows.extend(prompts)
        rows.extend({"prompt_id": "", "messages": [], **e} for e in errors)
    return pa.Table.from_pylist(rows, schema=PARSED)


def _repeated_ids(block: pa.Table) -> pa.Table:
    """The prompt ids a partition holding every row of its ids has more than once."""
    counts = pc.value_counts(block["prompt_id"])
    return pa.table({"prompt_id": counts.field("values").filter(pc.greater(counts.field("counts"), 1))},
                    schema=pa.schema([("prompt_id", pa.string())]))


def _with_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["prompt_id"], value_set=ids))


def _without_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["prompt_id"], value_set=ids)))


def read_corpus(loc: Location, *, fmt: str = "auto", fields: Fields | None = None, limit: int | None = None,
                max_chars: int = MAX_CHARS):
    """The corpus at `loc` as (prompts, errors) Ray Datasets, both materialised.

    A prompt_id seen more than once keeps its first row; the others become error rows.
    `limit` keeps the first N usable prompts in file order (for smoke runs).
    """
    fields = fields or Fields()
    import ray.data
    from ray.data.expressions import col

    from cousins.run.dataops import by_key, first_by, partitions_for

    exts = extensions(fmt)
    paths = list_files(loc, exts)
    if not paths:
        raise FileNotFoundError(f"corpus not found: no {'/'.join(exts)} files at {loc.url!r}")
    for p in paths:
        format_of(p, fmt)  # fail before any Ray work on a file whose format is unknown
    raw = ray.data.read_binary_files(paths, filesystem=loc.arrow_fs(), include_paths=True)
    parsed = raw.map_batches(_parse_batch, fn_kwargs={"fmt": fmt, "fields": fields, "max_chars": max_chars},
                             batch_format="numpy", batch_size=1).materialize()
    prompts = parsed.filter(expr=col("reason").is_null()).drop_columns(["reason", "raw"]).materialize()
    errors = parsed.filter(expr=col("reason").is_not_null()).select_columns(schema.ERRORS.names)

    # ids held by more than one prompt, found where each id's rows meet (one block when the corpus is small)
    dup_ids = [r["prompt_id"] for r in by_key(prompts.select_columns(["prompt_id"]), "prompt_id",
                                               partitions_for(prompts.count(), 100_000)).map_batches(
        _repeated_ids, batch_size=None, batch_format="pyarrow", num_cpus=0.1).take_all()]
    if dup_ids:  # rare, and only the rows sharing an id travel to the driver
        by_id = {"batch_format": "pyarrow", "fn_kwargs": {"ids": pa.array(dup_ids)}}
        keep, dup_errors = split_duplicates(prompts.map_batches(_with_ids, **by_id).take_all())
        prompts = prompts.map_batches(_without_ids, **by_id).union(
            ray.data.from_arrow(pa.Table.from_pylist(keep, schema=PARSED).drop_columns(["reason", "raw"])))
        errors = errors.union(ray.data.from_arrow(pa.Table.from_pylist(dup_errors, schema=schema.ERRORS)))
    if limit is not None:
        prompts = first_by(prompts, prompts.count(), ["source", "source_row"], limit)
    return prompts.materialize(), errors.materialize()


HEAD_BYTES = 1 << 20  # what first_prompts reads of a large JSONL/CSV file


def first_prompts(loc: Location, *, n: int, fmt: str = "auto", fields: Fields | None = None,
                  max_chars: int = MAX_CHARS) -> list[list[dict]]:
    """The messages of the corpus's first `n` usable prompts (in file order), read on the driver
    without Ray from the start of the first file(s): what the template check renders before any
    cluster work. Reads at most about HEAD_BYTES of a JSONL or CSV file, one batch of a Parquet one."""
    fields = fields or Fields()
    exts = extensions(fmt)
    out: list[list[dict]] = []
    for path in list_files(loc, exts):
        kind = format_of(path, fmt)
        with loc.fs.open(path, "rb") as f:
            if kind == "parquet":
                pf = pq.ParquetFile(f)
                batch = next(pf.iter_batches(batch_size=max(n * 4, 16)), None)
                if batch is None:
                    continue
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_batches([batch]), buf)
                data = buf.getvalue()
            else:
                data = f.read(HEAD_BYTES + 1)
                if len(data) > HEAD_BYTES:  # cut at the last whole line
                    data = data[:data.rfind(b"\n", 0, HEAD_BYTES) + 1]
        prompts, _ = parse_file(data, source=path, fmt=kind, fields=fields, max_chars=max_chars)
        out.extend(p["messages"] for p in prompts)
        if len(out) >= n:
            break
    return out[:n]
