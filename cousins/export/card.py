"""What an export says about itself: `dataset_card`, the README.md written beside the files (what
the data is, the producing run's provenance, the export settings, what each filter dropped, the
files, the schema and how to load it with datasets, pyarrow and DuckDB), and `filter_table`, the
plain-text summary of filters, rows, files and bytes that the export job prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone

from cousins.export.config import KD, SFT, ExportConfig, ExportResult


def dataset_card(cfg: ExportConfig, manifest: dict, model: str, r: ExportResult) -> str:
    """README.md of the export: what it is, where it came from, what was dropped, how to load it."""
    m = next(x for x in manifest["models"] if x["name"] == model)
    kind = "KD (SFT chats + per-token teacher top-k logprobs)" if cfg.kd else "SFT (chat messages)"
    rows = "\n".join(f"| {f.name} | {f.before} | {f.dropped} | {f.detail} |" for f in r.filters)
    files = "\n".join(f"| {f['name']} | {f['rows']} | {f['bytes']} |" for f in r.files)
    pattern = f"*.{cfg.format}"
    loader = "parquet" if cfg.format == "parquet" else "json"
    schema_ = KD if cfg.kd else SFT
    columns = "\n".join(f"| `{f.name}` | {f.type} |" for f in schema_)
    return f"""# {kind} data from run `{manifest['run_id']}`

Teacher generations exported by cousins on {datetime.now(timezone.utc).isoformat()}.

## Provenance

- producing run: `{manifest['run_id']}` (committed {manifest['committed']}, config hash `{manifest['config_hash']}`)
- teacher: `{model}` at `{m['path']}`, fingerprint `{m['fingerprint']}`, dtype {m['dtype']}, quantization {m['quantization']}
- sampling: `{json.dumps(manifest['sampling'])}`, {manifest['samples']} sample(s) per prompt, seed {manifest['seed']}
  (per-row seed rule: {manifest['seed_rule']})
- corpus: `{manifest['corpus']['path']}` ({manifest['corpus']['prompts']} prompts)
- versions: `{json.dumps(manifest['versions'])}`
- export settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'storage'})}`

## Rows

{r.rows_in} generated rows in, {r.rows_out} out; {r.output_tokens} assistant tokens;
{'%.1f' % r.bytes_per_output_token if r.bytes_per_output_token else '-'} bytes per assistant token on storage
({cfg.format}{', zstd' if cfg.format == 'parquet' else ''}{f', top-{r.topk} logprobs' if r.topk else ''}).

| filter (in order) | rows before | dropped | detail |
|---|---|---|---|
{rows}

| file | rows | bytes |
|---|---|---|
{files}

## Schema

| column | type |
|---|---|
{columns}

`messages` is the chat (the prompt's system/user turns, then the teacher's answer as `assistant`).
{'`token_ids` are the answer in the teacher vocabulary; `topk_token_ids`/`topk_logprobs` hold, per answer token, the teacher raw top-k (before temperature), sorted by logprob.' if cfg.kd else ''}

## Loading

```python
import datasets; ds = datasets.load_dataset("{loader}", data_files="{r.out_url}/{pattern}", split="train")
import pyarrow.dataset as pads; t = pads.dataset("{r.out_url}", format="{'parquet' if cfg.format == 'parquet' else 'json'}", exclude_invalid_files=True).to_table()
import duckdb; duckdb.sql("select count(*) from read_{'parquet' if cfg.format == 'parquet' else 'json'}('{r.out_url}/{pattern}')").fetchall()
```
"""


def filter_table(result: ExportResult) -> str:
    lines = [f"{'filter':<22} {'before':>8} {'dropped':>8}  detail"]
    lines += [f"{f.name:<22} {f.before:>8} {f.dropped:>8}  {f.detail}" for f in result.filters]
    size = sum(f["bytes"] for f in result.files)
    lines.append(f"{result.rows_in} rows in, {result.rows_out} out, {len(result.files)} file(s), {size} bytes, "
                 f"{result.output_tokens} assistant tokens"
                 + (f", {result.bytes_per_output_token:.1f} B/token" if result.bytes_per_output_token else "")
                 + f" -> {result.out_url}")
    if result.rows_in and not result.rows_out:
        lines.append("note: the filters dropped every row (the table says which): the export is one empty file "
                     "that carries the schema, and its card says so; loosen the filters to keep rows")
    return "\n".join(lines)

