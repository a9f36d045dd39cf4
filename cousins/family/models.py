"""Tiny models the project builds itself, offline and deterministically from a seed.

The tiny teacher is a 2-layer Llama (~1M parameters, fp32) with a byte-level BPE tokenizer (digits
split one per token) trained on this machine's Python standard library and on the teacher's lessons,
and a chat template. It is then taught the demo corpus's task families (cousins/family/lessons.py: worked
additions and letter reversals on held-out instances, look-ups, templated answers to the open
prompts) for 1000 steps, on the answer tokens only, until it is sharp: it answers most labelled demo
prompts correctly and keeps nearly all its probability in its top-20 on its own greedy answers, as
drift measurements need (a barely trained model's flat logits make every top-k a near-tie, every
accuracy zero and every flip rate 0). About 2 minutes on one CPU thread."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from cousins.contract.recipes import TINY_TEACHER
from cousins.run.removal import BUILD, publish_dir, scratch
from cousins.run.removal import check_ours as check_owned
from cousins.family.progress import quiet_saves

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "<|bos|>"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RECIPE_FILE = BUILD.name  # cousins_recipe.json, written last: a directory with it is a complete build


@dataclass(frozen=True)
class TinyLlamaRecipe:
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2  # head_dim 64: a size every vLLM attention backend supports
    max_position_embeddings: int = 1024
    corpus_files: int = 400  # stdlib files the tokenizer learns from (with the lessons)
    train_steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128  # longer lessons are cut
    lr: float = 3e-3
    warmup_steps: int = 50  # then cosine decay to lr / 20
    threads: int = 1  # torch threads while training: same threads, same weights (see cousins/family/student.py)


RECIPES = {TINY_TEACHER: TinyLlamaRecipe()}


def _stdlib_texts(n_files: int) -> list[str]:
    """The first `n_files` .py files of the stdlib in sorted order: present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:n_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _train_tokenizer(texts: list[str], recipe: TinyLlamaRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit: numbers then read and write digit by digit, which a model this small can
    # learn to add; merged digit tokens ("150") would make every sum a look-up of its own.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE, model_max_length=recipe.max_position_embeddings,
    )


def build_tiny_llama(out_dir: str | os.PathLike, recipe: TinyLlamaRecipe = TinyLlamaRecipe()) -> Path:
    """Build the tiny model into `out_dir` (HF layout: config, safetensors, tokenizer)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cousins.family.lessons import lessons

    out = Path(out_dir)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    t0 = time.perf_counter()
    texts = _stdlib_texts(recipe.corpus_files)
    chats = lessons(rng, recipe.train_steps * recipe.batch_size)
    # The tokenizer learns the lessons' words too (a capital is a token or two, not six).
    tokenizer = _train_tokenizer(texts + ["\n".join(m["content"] for m in c) for c in chats[:4000]], recipe)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        losses = train_model(model, _encode(tokenizer, chats, recipe.seq_len), tokenizer.pad_token_id, recipe)
    finally:
        torch.set_num_threads(saved_threads)

    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).unlink(missing_ok=True)
    quiet_saves()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    tenth = max(1, len(losses) // 10)
    (out / RECIPE_FILE).write_text(json.dumps({
        **asdict(recipe), "lessons": lessons_fingerprint(chats), "parameters": n_params,
        "build_s": round(time.perf_counter() - t0, 1),
        "loss_curve": [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 4)  # per tenth of training
                       for i in range(0, len(losses), tenth)]}, indent=2))
    return out


def lessons_fingerprint(chats: list[list[dict]]) -> str:
    """What the teacher was taught, in 16 hex digits: a build records it, and a later change of the
    lessons (cousins/family/lessons.py, the demo's families) makes ensure_model build again."""
    return hashlib.sha256(json.dumps(chats, sort_keys=True).encode()).hexdigest()[:16]


def _encode(tokenizer, chats: list[list[dict]], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per chat: the prompt as the chat template renders
    it for generation, then the answer and the end-of-turn token, tokenized apart, as a model
    generating after that prompt would produce them."""
    out = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(chat[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append(((p + a)[:max_len], len(p)))
    return out


def optimizer_step(model, opt, sched, loss) -> float:
    """One training step of every build here (teacher and students): backward, gradients clipped
    to norm 1, the optimizer's and the schedule's step; the step's loss."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_model(model, examples: list[tuple[list[int], int]], pad: int, recipe: TinyLlamaRecipe) -> list[float]:
    """Train in place on the answer tokens only (the loss of every step is returned)."""
    import math

    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    total = max(1, recipe.train_steps)
    warm = max(1, recipe.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, total - warm))))))
    losses = []
    model.train()
    for step in range(recipe.train_steps):
        batch = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        length = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), length), pad, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            x[i, :len(ids)] = torch.tensor(ids)
            labels[i, start:len(ids)] = torch.tensor(ids[start:])
        # The LM head only where an answer token is predicted: a third of the positions, and at
        # this size the vocabulary projection is the largest matrix product of the step.
        hidden = model.model(input_ids=x, attention_mask=(x != pad).long()).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        at = target != -100
        loss = F.cross_entropy(model.lm_head(hidden[at]), target[at])
        losses.append(optimizer_step(model, opt, sched, loss))
    model.eval()
    return losses


def read_build(path: str | os.PathLike) -> dict | None:
    """The marker of a complete build at `path` (what it was built from), or None."""
    marker = Path(path) / RECIPE_FILE
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, ValueError):
        return None


def tiny_recipe(recipe_name: str, seed: int) -> TinyLlamaRecipe:
    return TinyLlamaRecipe(**{**asdict(RECIPES[recipe_name]), "seed": seed})


def is_current(path: str | os.PathLike, recipe_name: str, seed: int = 0) -> bool:
    """Whether `path` holds a complete build of the tiny recipe `recipe_name` as the code builds it
    now: the same recipe fields and the same lessons (cousins/family/builds.py dispatches by recipe)."""
    from cousins.family.lessons import lessons

    done = read_build(path)
    recipe = tiny_recipe(recipe_name, seed)
    if done is None or any(done.get(k) != v for k, v in asdict(recipe).items()):
        return False
    taught = lessons(random.Random(recipe.seed), recipe.train_steps * recipe.batch_size)
    return done.get("lessons") == lessons_fingerprint(taught)


BUILD_REMEDY = "Point {setting} at a new directory for the build, or set its build to null to use the model there as it is"


def check_ours(path: str | os.PathLike, *, setting: str) -> None:
    """NotOurs unless `path` is absent, an empty directory, or a build of the project's (its
    RECIPE_FILE there; cousins/run/removal.py is the rule). A user's own model directory is never
    deleted or overwritten."""
    check_owned(path, BUILD, setting=setting, remedy=BUILD_REMEDY.format(setting=setting))


@contextlib.contextmanager
def building(path: str | os.PathLike):
    """One build of `path` at a time on this machine (two jobs, or two test processes, asking for
    the same model): an exclusive lock on a file in the system's temporary directory named after
    the path, never a file beside it."""
    import fcntl
    import tempfile

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"cousins-build-{key}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_build(path: str | os.PathLike, build: Callable[[Path], object], *, setting: str,
                  current: Callable[[], bool] | None = None) -> bool:
    """Run `build` into a temporary sibling of `path` and rename the result into place, replacing
    only a build of the project's: a killed build leaves nothing that looks complete, and a user's
    directory is refused (NotOurs) before and after the build. Builds of one path take turns
    (`building`); `current()`, asked once it is this one's turn, says another process has just
    built it: then nothing is built (False)."""
    with building(path):
        if current is not None and current():
            return False
        check_ours(path, setting=setting)
        with scratch(path) as tmp:
            build(Path(tmp.path))
            publish_dir(tmp, path, BUILD, setting=setting, remedy=BUILD_REMEDY.format(setting=setting))
    return True
