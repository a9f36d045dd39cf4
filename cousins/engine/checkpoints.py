"""Where a model's files are, and a local directory of them: the one place that turns what a user
names (a directory, a storage URL, a Hugging Face hub id, a GGUF file, a LoRA adapter) into files.

- a **local directory** (or a `.gguf` file) is used where it is;
- a **URL** on the storage (`s3://bucket/models/q4`, any fsspec URL) is fetched once per node into
  a cache (`COUSINS_MODEL_CACHE`, default `~/.cache/cousins/models`), under a lock so the engine
  actors of one node fetch it once, published whole (a temporary directory renamed into place,
  its listing written last), and fetched again when the listing on the storage changed;
- a **hub id** (`Qwen/Qwen2.5-7B-Instruct`, or `hf://Qwen/Qwen2.5-7B-Instruct`) with an optional
  `revision` goes through `huggingface_hub.snapshot_download`, which honours `HF_HOME`, `HF_TOKEN`
  and `HF_HUB_OFFLINE` (an offline node uses what its cache holds).

The driver fetches only the small files (`meta=True`: config, tokenizer, chat template, adapter
config) to validate a run before Ray starts; the engine actors fetch everything, on their node.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from cousins.contract.refs import HUB_PREFIX, is_gguf, kind
from cousins.run.removal import FETCHED as FETCHED_MARK
from cousins.run.removal import MERGED as MERGED_MARK
from cousins.run.removal import publish_dir, scratch

# What validation needs of a checkpoint: never the weights.
META_PATTERNS = ("*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt")
FETCHED = FETCHED_MARK.name  # .cousins-fetched.json, written last into a fetched copy: its source and listing
CACHE_ENV = "COUSINS_MODEL_CACHE"


class CheckpointError(ValueError):
    """A model reference that cannot be turned into files; the message says what to change."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cousins" / "models")


def local_copy(ref: str, *, revision: str | None = None, meta: bool = False, options: dict | None = None) -> str:
    """A local path holding `ref`'s files (all of them, or with `meta` only the small ones).
    CheckpointError with the remedy when it cannot be had."""
    k = kind(ref)
    if k == "local":
        return os.path.expanduser(ref)
    if k == "hub":
        return _from_hub(ref[len(HUB_PREFIX):] if ref.startswith(HUB_PREFIX) else ref, revision, meta)
    return _from_storage(ref, meta, options or {})


def _from_hub(repo: str, revision: str | None, meta: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    # Read at call time (huggingface_hub reads them once, at its import): a process may set them later.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(META_PATTERNS) if meta else None,
                                 cache_dir=cache, local_files_only=offline)
    except RevisionNotFoundError:
        raise CheckpointError(f"hub model {repo!r} has no revision {revision!r}: set its revision to a branch, "
                              f"tag or commit of the repository") from None
    except GatedRepoError:
        raise CheckpointError(f"hub model {repo!r} is gated: accept its terms on the hub and set HF_TOKEN "
                              f"(on every node: the job forwards it)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub model {repo!r} was not found (a private one needs HF_TOKEN); if you meant a "
                              f"local directory, it does not exist: give its absolute path") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set and" if offline else "the hub cannot be reached and"
        raise CheckpointError(f"hub model {repo!r}{f' revision {revision!r}' if revision else ''}: {where} the "
                              f"cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) does not hold "
                              f"it; download it there first (`huggingface-cli download {repo}`), or name a local "
                              f"directory") from None


def _listing(fs, root: str, meta: bool) -> list[tuple[str, int, str]]:
    """(relative name, size, version) of every file under `root`: what a cached copy is checked against."""
    import fnmatch

    out = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root):].lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if not rel or name.startswith(".") or info.get("type") == "directory":
            continue
        if meta and not any(fnmatch.fnmatch(name, p) for p in META_PATTERNS):
            continue
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        out.append((rel, int(info.get("size") or 0), version))
    return out


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between the processes of one node (the engine actors sharing a cache)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _from_storage(url: str, meta: bool, options: dict) -> str:
    from cousins.run.storage import resolve

    loc = resolve(url, **options)
    fs, root = loc.fs, loc.path.rstrip("/")
    try:
        if fs.isfile(root):  # one file (a .gguf): its parent is fetched with only it
            listing = [(root.rsplit("/", 1)[-1], int(fs.size(root)), "")]
            root = root.rsplit("/", 1)[0]
        else:
            listing = _listing(fs, root, meta)
    except OSError as e:
        raise CheckpointError(f"model {url}: the storage does not answer ({type(e).__name__}: {e})") from None
    if not listing:
        raise CheckpointError(f"model {url}: nothing there (a model is a directory with config.json, "
                              f"weights and tokenizer files)")
    key = hashlib.sha256(f"{url}|{'meta' if meta else 'all'}".encode()).hexdigest()[:20]
    dest = cache_root() / key
    want = {"source": url, "files": [list(x) for x in listing]}
    with _locked(cache_root() / f"{key}.lock"):
        if _read_fetched(dest) == want:
            return _entry_path(dest, url, fs.isfile(loc.path.rstrip("/")))
        with scratch(dest) as scratch_loc:
            tmp = Path(scratch_loc.path)
            t0 = time.perf_counter()
            for rel, _, _ in listing:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(target))
            (tmp / FETCHED).write_text(json.dumps({**want, "fetch_s": round(time.perf_counter() - t0, 1)}))
            # an older copy of ours is replaced; anything else at that name is refused
            publish_dir(scratch_loc, dest, FETCHED_MARK, setting=CACHE_ENV)
    return _entry_path(dest, url, fs.isfile(loc.path.rstrip("/")))


def _entry_path(dest: Path, url: str, single_file: bool) -> str:
    return str(dest / url.rstrip("/").rsplit("/", 1)[-1]) if single_file else str(dest)


def _read_fetched(dest: Path) -> dict | None:
    try:
        data = json.loads((dest / FETCHED).read_text())
        return {"source": data["source"], "files": data["files"]}
    except (OSError, ValueError, KeyError):
        return None


# --- what validation reads of a checkpoint ---------------------------------------------------------

@functools.lru_cache(maxsize=64)
def metadata_dir(ref: str, revision: str | None = None) -> str:
    """A local directory with `ref`'s small files (cached for the process: validation reads it often)."""
    path = local_copy(ref, revision=revision, meta=True)
    return str(Path(path).parent) if is_gguf(path) else path


def read_json(ref: str, revision: str | None, name: str) -> dict | None:
    try:
        return json.loads((Path(metadata_dir(ref, revision)) / name).read_text())
    except FileNotFoundError:
        return None


def model_config(ref: str, revision: str | None = None) -> dict:
    """`ref`'s config.json (the text config of a multimodal one), or CheckpointError."""
    if is_gguf(ref):
        return {}  # the architecture is inside the GGUF file; vLLM reads it there
    cfg = read_json(ref, revision, "config.json")
    if cfg is None:
        raise CheckpointError(f"{ref}: no config.json there (a model is a directory in Hugging Face layout: "
                              f"config.json, *.safetensors, tokenizer files)")
    if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):  # a multimodal model's language part
        return {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "quantization_config"}}
    return cfg


CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "max_seq_len")


def context_length(config: dict) -> int | None:
    """The context the model was trained for, as its config says (None if it says not)."""
    for k in CONTEXT_KEYS:
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return None


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int | None:
    """KV cache bytes one token takes in every layer (keys and values), from the config's shapes."""
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not (layers and heads and hidden):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * dtype_bytes


def adapter_config(ref: str, revision: str | None = None) -> dict:
    """A LoRA adapter's adapter_config.json (PEFT layout), or CheckpointError."""
    cfg = read_json(ref, revision, "adapter_config.json")
    if cfg is None:
        raise CheckpointError(f"LoRA adapter {ref}: no adapter_config.json there (PEFT's layout: "
                              f"adapter_config.json and adapter_model.safetensors)")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"adapter {ref} is a {cfg.get('peft_type')} adapter; vLLM serves LoRA adapters only")
    return cfg


# vLLM's accepted max_lora_rank values (vllm/config/lora.py)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(cfg: dict) -> int:
    """The smallest rank vLLM accepts that holds the adapter's rank (r, and any per-module rank)."""
    r = max([int(cfg.get("r") or 8), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]])
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise CheckpointError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


# --- LoRA adapters merged into their base ----------------------------------------------------------
# vLLM serves an adapter (enable_lora) for generation, but its teacher-forced prompt logprobs under
# an adapter are wrong or fail (vllm-project/vllm#16668: one LoRA mapping for sampling and prompt
# logprobs; on vLLM 0.32's CPU build a batch of such requests raises in the LoRA logits einsum), so
# a LoRA cousin whose tokens are scored runs the adapter merged into the weights: W + s·B·A.
MERGED = MERGED_MARK.name


def _lora_deltas(adapter_dir: Path) -> dict[str, tuple]:
    """base weight name -> (A, B, scale, transpose) from a PEFT adapter directory."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: a DoRA adapter; only plain LoRA adapters can be merged")
    files = [adapter_dir / "adapter_model.safetensors"]
    if not files[0].exists():
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors (PEFT's layout)")
    tensors = load_file(str(files[0]))
    r, alpha = int(cfg.get("r") or 8), float(cfg.get("lora_alpha") or cfg.get("r") or 8)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key and ".lora_embedding_A" not in key:
            continue
        embedding = ".lora_embedding_A" in key
        b = tensors.get(key.replace("lora_embedding_A", "lora_embedding_B") if embedding
                        else key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise CheckpointError(f"{adapter_dir}: {key} has no matching lora_B tensor")
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        short = module.rsplit(".", 1)[-1]
        rr = int(next((v for k, v in ranks.items() if module.endswith(k)), r))
        aa = float(next((v for k, v in alphas.items() if module.endswith(k)), alpha))
        scale = aa / (rr ** 0.5) if cfg.get("use_rslora") else aa / rr
        out[f"{module}.weight"] = (a, b, scale, embedding or bool(cfg.get("fan_in_fan_out")), short)
    if not out:
        raise CheckpointError(f"{adapter_dir}: no LoRA tensors in adapter_model.safetensors")
    return out


def merged_lora(base: str, adapter: str) -> str:
    """A local directory holding `base` (a local directory) with `adapter` merged into its weights,
    made once per node in the model cache (under a lock, renamed into place whole) and reused while
    both are unchanged. Each weight is merged in float32 and stored in its own dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, adapter_dir = Path(base), Path(adapter)
    ident = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for d in (base_dir, adapter_dir)
                        for p in sorted(d.iterdir()) if p.is_file()])
    key = "lora-" + hashlib.sha256(f"{base_dir.resolve()}|{adapter_dir.resolve()}|{ident}".encode()).hexdigest()[:20]
    dest = cache_root() / key
    with _locked(cache_root() / f"{key}.lock"):
        if (dest / MERGED).exists():
            return str(dest)
        deltas = _lora_deltas(adapter_dir)
        with scratch(dest) as scratch_loc:
            tmp = Path(scratch_loc.path)
            t0, done = time.perf_counter(), set()
            for f in sorted(base_dir.iterdir()):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix != ".safetensors":
                    shutil.copy2(f, tmp / f.name)
                    continue
                tensors, meta = {}, None
                with safe_open(str(f), framework="pt") as shard:
                    meta = shard.metadata()
                    for name in shard.keys():
                        w = shard.get_tensor(name)
                        if name in deltas:
                            a, b, scale, transpose, _ = deltas[name]
                            delta = (b.float() @ a.float()) * scale
                            w = (w.float() + (delta.T if transpose else delta)).to(w.dtype)
                            done.add(name)
                        tensors[name] = w.contiguous()
                save_file(tensors, str(tmp / f.name), metadata=meta)
            missing = sorted(set(deltas) - done)
            if missing:
                raise CheckpointError(f"LoRA adapter {adapter} names weights its base {base} does not have "
                                      f"(first: {missing[0]}): is it an adapter of another model?")
            (tmp / MERGED).write_text(json.dumps({"base": str(base), "adapter": str(adapter), "weights": len(done),
                                                  "merge_s": round(time.perf_counter() - t0, 1)}))
            publish_dir(scratch_loc, dest, MERGED_MARK, setting=CACHE_ENV)
    return str(dest)
