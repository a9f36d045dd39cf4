"""Distilled cousins: a smaller student trained on the teacher's own generations from a committed run.

This closes the loop the product exists for: generate teacher data, train a student on it, then
measure how far the student drifts from the teacher with the same pipeline as any other cousin.

The student is a Llama with the teacher's hidden size and head size (head_dim 64: a size every vLLM
attention backend supports) but fewer layers and a narrower MLP. The teacher's tokenizer files are
copied byte for byte: drift metrics compare token distributions, so the vocabularies must be identical.

Training sequences are `tokenizer.encode(prompt_text, add_special_tokens=False)` (the prompt as the
teacher saw it, chat template already applied) followed by the teacher's `output_token_ids`. The loss
is taken on output positions only:

- ``sft``: cross-entropy on the teacher's sampled tokens.
- ``kd``: at every output position, KL(p̃ ‖ q) where p̃ is the teacher's stored top-k distribution
  renormalised over its k entries and q is the student's full-vocabulary softmax (the student is not
  renormalised, so the KL is >= 0 and 0 only when the student puts exactly p̃ on those k tokens).
  ``kd_ce_weight`` > 0 adds that weight times the sft cross-entropy (default 0: pure KD).

Determinism: weights depend only on the seed, the recipe and the data. Rows are put in a fixed order
(sorted by prompt_id, sample_index) before a seeded shuffle, and `torch.manual_seed(seed)` drives
init. CPU float reductions can depend on the number of torch threads, so the build pins it
(`threads`, default 1, restored afterwards): bit-identical weights need the same `threads`. One thread
is also the fast choice for a model this small: on this 2-CPU machine under load from other
processes, 2 threads made each step ~7x slower (OpenMP workers spin-waiting for a CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from cousins.family.models import RECIPE_FILE, check_ours, optimizer_step, replace_build
from cousins.contract.recipes import TINY_STUDENT
from cousins.contract.schema import row_keys
from cousins.family.progress import quiet_saves

# What training needs from a GENERATIONS row; the rest of the row is not read.
TRAIN_COLUMNS = ["prompt_id", "sample_index", "prompt_text", "output_token_ids", "topk_token_ids",
                 "topk_logprobs", "finish_reason"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
SOURCE_KEY = b"cousins.source_run"  # schema metadata read_teacher_data leaves on its table
TEACHER_KEY = b"cousins.teacher"


@dataclass(frozen=True)
class StudentRecipe:
    """The student's sizes and training settings (the teacher is TinyLlamaRecipe: 2 layers, MLP 384).

    init: "random", or "teacher" = start from the teacher's embeddings, final norm and LM head, and
    its layer `teacher_layer` (attention and norms whole, MLP cut to the first `intermediate_size`
    channels). Either way every other weight is random from the seed.
    """

    mode: str = "sft"  # "sft" | "kd"
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 1
    num_heads: int = 2  # head_dim 64
    init: str = "random"  # "random" | "teacher"
    teacher_layer: int = 0  # which teacher layer "teacher" init copies
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    max_len: int = 256  # prompt + output tokens; longer outputs are cut
    kd_ce_weight: float = 0.0  # kd mode: loss = KL + kd_ce_weight * CE
    threads: int = 1  # torch threads while building (see the module docstring)

    def validate(self) -> None:
        if self.mode not in ("sft", "kd"):
            raise ValueError(f"mode must be 'sft' or 'kd', got {self.mode!r}")
        if self.init not in ("random", "teacher"):
            raise ValueError(f"init must be 'random' or 'teacher', got {self.init!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.steps < 0 or min(self.batch_size, self.num_layers, self.threads) < 1:
            raise ValueError("steps must be >= 0; batch_size, num_layers and threads >= 1")


# --- teacher data --------------------------------------------------------------------------------

def read_teacher_data(run_url_or_path: str, teacher_name: str,
                      storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The teacher's usable generation rows of a committed run ({root}/runs/{run_id}, any fsspec URL).

    Rows with an error or no output tokens are skipped; rows are sorted by (prompt_id, sample_index)
    and deduplicated on that key, so the table does not depend on file order. The run URL and the
    teacher's name ride along in the schema metadata for build_student's recipe file.
    """
    import pyarrow.compute as pc

    from cousins.run.lifecycle import NotCommitted, committed_at
    from cousins.run.layout import part_files

    try:
        run = committed_at(run_url_or_path, **(storage_options or {}))
    except NotCommitted as e:
        raise FileNotFoundError(f"{run_url_or_path} is not a committed run: {e}") from None
    stage = run.layout.generations(teacher_name)
    if not part_files(stage):
        raise FileNotFoundError(f"run {run.url} has no generations for model {teacher_name!r}")
    t = run.read(stage, TRAIN_COLUMNS + ["error"])
    ok = pc.and_(pc.is_null(t["error"]), pc.fill_null(pc.greater(pc.list_value_length(t["output_token_ids"]), 0),
                                                    False))
    t = t.filter(ok).drop_columns(["error"]).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    keys = row_keys(t)
    first = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    if len(first) != t.num_rows:
        t = t.take(first)
    return t.replace_schema_metadata({SOURCE_KEY: run.url.encode(), TEACHER_KEY: teacher_name.encode()})


# --- examples ------------------------------------------------------------------------------------

@dataclass
class _Example:
    ids: list[int]  # prompt + output tokens
    start: int  # index of the first output token in ids
    topk_ids: list[list[int]] | None  # one entry per output token kept
    topk_lp: list[list[float]] | None


def _examples(tokenizer, data: pa.Table, recipe: StudentRecipe) -> list[_Example]:
    need = {"prompt_text", "output_token_ids"} | ({"topk_token_ids", "topk_logprobs"} if recipe.mode == "kd" else set())
    missing = need - set(data.column_names)
    if missing:
        raise ValueError(f"data lacks columns {sorted(missing)} needed for mode {recipe.mode!r}")
    d = data.select(sorted(need)).to_pydict()
    out = []
    for i, (prompt, output) in enumerate(zip(d["prompt_text"], d["output_token_ids"])):
        if not prompt or not output:
            continue
        p = tokenizer.encode(prompt, add_special_tokens=False)
        n = min(len(output), recipe.max_len - len(p))
        if n <= 0:
            continue
        tk = tl = None
        if recipe.mode == "kd":
            tk, tl = d["topk_token_ids"][i], d["topk_logprobs"][i]
            if not tk or not tl or len(tk) < n or len(tl) < n:
                raise ValueError(f"row {i}: kd needs top-k logprobs at every output position "
                                 "(a run with run.sampling.logprobs > 0)")
            tk, tl = tk[:n], tl[:n]
        out.append(_Example(p + list(output[:n]), len(p), tk, tl))
    if not out:
        raise ValueError("no usable training rows (need prompt_text and output_token_ids)")
    return out


def _fingerprint(examples: list[_Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.start, e.topk_ids, e.topk_lp]).encode())
    return h.hexdigest()[:16]


def _batch(examples: list[_Example], pad: int, kd: bool):
    """Right-padded inputs, the positions whose next token is an output token, and KD targets there."""
    import torch

    length = max(len(e.ids) for e in examples)
    b = len(examples)
    x = torch.full((b, length), pad, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    target = torch.full((b, length - 1), -100, dtype=torch.long)  # logits[:, t] predict x[:, t + 1]
    k = max((len(r) for e in examples for r in (e.topk_ids or [])), default=1) if kd else 1
    tk_ids = torch.zeros((b, length - 1, k), dtype=torch.long)
    tk_lp = torch.full((b, length - 1, k), float("-inf"))
    for i, e in enumerate(examples):
        x[i, :len(e.ids)] = torch.tensor(e.ids)
        attn[i, :len(e.ids)] = 1
        target[i, e.start - 1:len(e.ids) - 1] = torch.tensor(e.ids[e.start:])
        if kd:
            for j, (ids, lps) in enumerate(zip(e.topk_ids, e.topk_lp)):
                tk_ids[i, e.start - 1 + j, :len(ids)] = torch.tensor(ids)
                tk_lp[i, e.start - 1 + j, :len(lps)] = torch.tensor(lps)
    return x, attn, target, tk_ids, tk_lp


def _loss(model, batch, recipe: StudentRecipe):
    import torch
    import torch.nn.functional as F

    x, attn, target, tk_ids, tk_lp = batch
    logits = model(input_ids=x, attention_mask=attn).logits[:, :-1].float()
    mask = target != -100
    logq = F.log_softmax(logits, dim=-1)
    ce = F.nll_loss(logq[mask], target[mask])
    if recipe.mode == "sft":
        return ce
    p_logp = torch.log_softmax(tk_lp[mask], dim=-1)  # teacher top-k renormalised over its k entries
    p = p_logp.exp()
    kept = p > 0  # padded (or -inf) entries carry no mass
    logq_k = logq[mask].gather(-1, tk_ids[mask])
    kl = torch.where(kept, p * (p_logp.masked_fill(~kept, 0.0) - logq_k), 0.0).sum(-1).mean()
    return kl + recipe.kd_ce_weight * ce if recipe.kd_ce_weight else kl


# --- the model -----------------------------------------------------------------------------------

def _student_config(teacher_cfg, recipe: StudentRecipe):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=teacher_cfg.vocab_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=teacher_cfg.max_position_embeddings, tie_word_embeddings=False,
        rms_norm_eps=teacher_cfg.rms_norm_eps, rope_parameters=teacher_cfg.rope_parameters,
        bos_token_id=teacher_cfg.bos_token_id, eos_token_id=teacher_cfg.eos_token_id,
        pad_token_id=teacher_cfg.pad_token_id, torch_dtype="float32",
    )


def _init_from_teacher(student, teacher_dir: Path, recipe: StudentRecipe) -> None:
    import torch
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    if recipe.hidden_size != teacher.config.hidden_size:
        raise ValueError("init='teacher' needs the teacher's hidden_size")
    if not 0 <= recipe.teacher_layer < teacher.config.num_hidden_layers:
        raise ValueError(f"teacher_layer {recipe.teacher_layer} out of range")
    t_sd = teacher.state_dict()
    src = f"model.layers.{recipe.teacher_layer}."
    with torch.no_grad():
        for name, param in student.state_dict().items():
            if name.startswith("model.layers."):
                rest = name.split(".", 3)[3]
                w = t_sd[src + rest]
                if rest.startswith("mlp."):  # the first intermediate_size channels
                    w = w[:param.shape[0], :param.shape[1]]
            else:
                w = t_sd[name]
            if w.shape != param.shape:
                raise ValueError(f"init='teacher': {name} shape {tuple(w.shape)} != {tuple(param.shape)}")
            param.copy_(w)


def _train(model, examples: list[_Example], pad: int, recipe: StudentRecipe) -> list[float]:
    """Train in place; returns the loss of every step. Epochs are seeded shuffles of the fixed order."""
    import torch

    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps)))
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        loss = _loss(model, _batch([examples[i] for i in idx], pad, recipe.mode == "kd"), recipe)
        losses.append(optimizer_step(model, opt, sched, loss))
    model.eval()
    return losses


def _eval_loss(model, examples: list[_Example], pad: int, recipe: StudentRecipe) -> float:
    """The training loss over all examples (token-weighted per batch of 32, averaged over batches)."""
    import torch

    total = n = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            chunk = examples[i:i + 32]
            w = sum(len(e.ids) - e.start for e in chunk)
            total += float(_loss(model, _batch(chunk, pad, recipe.mode == "kd"), recipe)) * w
            n += w
    return total / n


def _settings(recipe: StudentRecipe, teacher_dir: Path, fingerprint: str) -> dict:
    from cousins.family.models import read_build

    return {"recipe": TINY_STUDENT, **asdict(recipe), "teacher": str(teacher_dir),
            "teacher_build": read_build(teacher_dir),  # the teacher's own marker: a rebuilt teacher, a new student
            "data_fingerprint": fingerprint}


def build_student(out_dir: str | os.PathLike, teacher_dir: str | os.PathLike, data: pa.Table, *,
                  mode: str | None = None, seed: int | None = None, steps: int | None = None,
                  recipe: StudentRecipe | None = None, source: str | None = None,
                  setting: str = "the student's path", **overrides: Any) -> Path:
    """Train a student on `data` (GENERATIONS rows: prompt_text, output_token_ids, and for kd the
    top-k columns) and save it to `out_dir` in the HF layout with the teacher's tokenizer.

    `recipe` (default StudentRecipe(): mode "sft", seed 0) is overridden by `mode`, `seed`, `steps`
    when given and by any other StudentRecipe field passed as a keyword. `source` (the run the data
    came from, for the recipe file) defaults to what read_teacher_data recorded on the table.
    The build goes to a temporary sibling directory renamed into place; `cousins_recipe.json` is
    written last. If `out_dir` already holds a build with the
    same settings (recipe, teacher and its build, data fingerprint), it is returned untouched.
    """
    import torch
    from transformers import AutoTokenizer

    given = {"mode": mode, "seed": seed, "steps": steps}
    recipe = replace(recipe or StudentRecipe(), **{k: v for k, v in given.items() if v is not None}, **overrides)
    recipe.validate()
    out, teacher_dir = Path(out_dir), Path(teacher_dir).resolve()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    examples = _examples(tokenizer, data, recipe)
    settings = _settings(recipe, teacher_dir, _fingerprint(examples))
    marker = out / RECIPE_FILE
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if {k: done.get(k) for k in settings} == settings:
            return out
    check_ours(out, setting=setting)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _build(out, teacher_dir, tokenizer, examples, settings, recipe, data.schema.metadata or {}, source,
                      setting=setting)
    finally:
        torch.set_num_threads(saved_threads)


def _build(out: Path, teacher_dir: Path, tokenizer, examples: list[_Example], settings: dict,
           recipe: StudentRecipe, meta: dict, source: str | None, *, setting: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = source or (meta[SOURCE_KEY].decode() if SOURCE_KEY in meta else None)
    teacher_cfg = LlamaConfig.from_pretrained(teacher_dir)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(_student_config(teacher_cfg, recipe))
    if recipe.init == "teacher":
        _init_from_teacher(model, teacher_dir, recipe)
    pad = tokenizer.pad_token_id
    initial = _eval_loss(model, examples, pad, recipe)
    t0 = time.perf_counter()
    losses = _train(model, examples, pad, recipe)
    train_s = time.perf_counter() - t0
    final = _eval_loss(model, examples, pad, recipe)

    n_params = sum(p.numel() for p in model.parameters())
    window = max(1, min(20, len(losses) // 5 or 1))
    chunk = max(1, len(losses) // 10)
    record = {
        **settings, "source_run": source,
        "teacher_name": meta[TEACHER_KEY].decode() if TEACHER_KEY in meta else None,
        "rows_used": len(examples), "output_tokens": sum(len(e.ids) - e.start for e in examples),
        "parameters": n_params,
        "loss_initial": initial, "loss_final": final,  # over all training rows, before and after
        "loss_first_steps": sum(losses[:window]) / window if losses else None,
        "loss_last_steps": sum(losses[-window:]) / window if losses else None,
        "loss_curve": [round(sum(losses[i:i + chunk]) / len(losses[i:i + chunk]), 4)
                       for i in range(0, len(losses), chunk)],  # mean step loss per tenth of training
        "train_s": round(train_s, 2),
    }

    def save(tmp: Path) -> None:
        quiet_saves()
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # copied unchanged: the vocabulary must be the teacher's
            if (teacher_dir / name).exists():
                shutil.copyfile(teacher_dir / name, tmp / name)
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2))

    replace_build(out, save, setting=setting)
    return out
