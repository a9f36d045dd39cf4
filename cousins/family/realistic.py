"""A family with the shapes of a real one, built offline: a Qwen2-style teacher and a student of
another size, both with a ~110k-entry byte-level BPE vocabulary and logit heads padded beyond it.

What users bring (Qwen2.5/Qwen3, Llama-3) differs from the tiny teacher in ways the pipeline must
survive, so this family has them all:

- a vocabulary of over 100,000 entries (byte-level BPE trained here on the whole Python standard
  library, recursively, plus the lessons: ~31 MB, 10-30 s on 2 busy cores), digits one per token as
  Qwen's regex splits them, and Qwen's special tokens appended after the learned entries (`<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>` special; `<think>`, `</think>` ordinary added tokens, as in Qwen3);
- a ChatML chat template with Qwen3's thinking switch: `enable_thinking=False` appends an empty
  `<think>\\n\\n</think>\\n\\n` after the assistant header; the default (thinking) leaves it to the model;
- GQA attention (fewer key/value heads than heads; head_dim 64, as vLLM's Qwen2 derives it from
  hidden_size / heads), untied embeddings, and a logit head wider than the tokenizer (config
  `vocab_size` = len(tokenizer) rounded up to `pad_vocab_to`, always with padding rows), as
  Qwen's 151,936-row head over a 151,665-entry tokenizer.

Training cost. A full softmax over 110k rows costs ~1.5 s a step on one thread here. The lessons use
about 550 of the ids; every other id (the rest of the vocabulary and the padding rows) is
never an input nor a target, so under full-vocabulary training its output row only ever receives
the same gradient as every other such row: started equal, they would stay equal. Training ties
them: ONE shared row whose logit counts `n_tail` times in the softmax normaliser (an exact
full-vocabulary loss for that parameter tying), on a compact model over the lessons' tokens. The
saved model then has every tail row = the shared row + a small fixed per-row jitter (`tail_jitter`,
from the seed, so tail ties break the same way on every load), and the tail's input embeddings as
initialised. The tail ends with near-zero mass, as a real model's unused and padding rows do: the
build measures it on held lessons and records it in the marker (`tail_mass`, `padding_mass`).

The lessons are cousins/family/lessons.py's realistic ones (REALISTIC_WEIGHTS: the tiny teacher's
families plus GSM8K-style word problems and multiple-choice questions), answer tokens only, as
cousins/family/models.py teaches them. A `thinking_share` of them are rendered with thinking on: there
the model writes a think span before its answer, holding the working of a lesson that has some (the
digit sums of an addition or a word problem, a reversal letter by letter, the fact behind a choice)
and empty otherwise; with thinking off, the template writes the empty span and the answer is the
lesson's plain one (an addition worked in the open).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cousins.family.models import RECIPE_FILE, lessons_fingerprint, read_build
from cousins.contract.recipes import REALISTIC_STUDENT, REALISTIC_TEACHER
from cousins.family.progress import quiet_saves

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special: skipped when decoding
THINK = ["<think>", "</think>"]  # ordinary added tokens: kept in the text, as Qwen3's
# Qwen2's pre-tokenizer regex: contractions, letters (with one leading non-letter), single digits,
# punctuation runs, newlines and spaces.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# ChatML, with Qwen3's switch. (HF renders templates with trim_blocks: no newline right after a tag.)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}" + EMPTY_THINK + "{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class QwenRecipe:
    seed: int = 0
    tokenizer_entries: int = 110_000  # learned BPE entries (bytes + merges); the special tokens come after
    pad_vocab_to: int = 256  # config vocab_size: the next multiple above len(tokenizer) (>= 1 padding row)
    hidden_size: int = 128
    intermediate_size: int = 384  # a multiple of 128: W4A16's groups of 128 fit every Linear
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads = 64
    num_kv_heads: int = 1  # GQA
    max_position_embeddings: int = 2048
    train_steps: int = 900
    batch_size: int = 32
    seq_len: int = 160  # longer lessons are cut
    lr: float = 3e-3
    warmup_steps: int = 50  # then cosine decay to lr / 20 (cousins/family/models.py's schedule)
    thinking_share: float = 0.4  # lessons rendered with thinking on: the answer starts with a think span
    tail_jitter: float = 0.02  # std of the fixed per-row offsets of the tail rows (see the module docstring)
    threads: int = 1  # torch threads while training: same threads, same weights


RECIPES = {
    REALISTIC_TEACHER: QwenRecipe(),
    # Another size and another padding (1024: 110,592 rows against the teacher's 110,080).
    REALISTIC_STUDENT: QwenRecipe(hidden_size=64, intermediate_size=256, num_layers=1, num_heads=1,
                                  num_kv_heads=1, pad_vocab_to=1024, train_steps=600),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def recipe(name: str, seed: int = 0, **changes) -> QwenRecipe:
    if name not in RECIPES:
        raise KeyError(f"unknown realistic recipe {name!r}; known: {sorted(RECIPES)}")
    return replace(RECIPES[name], seed=seed, **changes)


def padded_vocab(n_tokens: int, multiple: int) -> int:
    """The next multiple of `multiple` strictly above `n_tokens`: the head always has padding rows."""
    return (n_tokens // multiple + 1) * multiple


# ---------------------------------------------------------------------------------------- tokenizer
def stdlib_texts() -> list[str]:
    """Every .py file of the standard library, recursively, in sorted order (site-packages left out:
    it differs between machines)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], entries: int, max_len: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=entries, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() < entries:
        raise ValueError(f"the tokenizer learned {tok.get_vocab_size()} entries, fewer than {entries}: "
                         f"the corpus is too small (lower tokenizer_entries or add text)")
    # Appended after the learned entries, as Qwen's are (151,643 learned, then the added tokens).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=max_len)


# ------------------------------------------------------------------------------------------ lessons
def _encode(tokenizer, chats: list[list[dict]], r: QwenRecipe, rng: random.Random) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per chat, the prompt rendered as vLLM renders it
    (thinking on or off), the answer then `<|im_end|>`; with thinking on, the answer starts with
    the think span the model writes itself (the lesson's thinking form, else an empty span)."""
    out = []
    for chat in chats:
        thinking = rng.random() < r.thinking_share
        prompt = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in chat[:-1]],
                                               add_generation_prompt=True, tokenize=False, enable_thinking=thinking)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        reply = (chat[-1].get("thinking") or EMPTY_THINK + chat[-1]["content"]) if thinking else chat[-1]["content"]
        a = tokenizer.encode(reply, add_special_tokens=False)
        out.append(((p + a + [tokenizer.eos_token_id])[:r.seq_len], len(p)))
    return out


def _tail_head(linear, n_tail: int):
    """The compact model's LM head: its last row stands for every tail id, so its logit counts
    n_tail times in the softmax normaliser (+ log n_tail)."""
    import torch

    class TailHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear
            self.register_buffer("offset", torch.zeros(linear.out_features))
            self.offset[-1] = math.log(n_tail)

        def forward(self, h):
            return self.linear(h) + self.offset

    return TailHead()


def _config(r: QwenRecipe, vocab: int, eos: int, pad: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_layers, num_attention_heads=r.num_heads, num_key_value_heads=r.num_kv_heads,
        max_position_embeddings=r.max_position_embeddings, rope_theta=1e6, tie_word_embeddings=False,
        eos_token_id=eos, pad_token_id=pad, torch_dtype="float32")


def _teach(tokenizer, r: QwenRecipe):
    """Train the compact model on the lessons and expand it to the full padded head; returns
    (model, losses, chats, tail masses measured on held lessons)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from cousins.family.lessons import realistic_lessons
    from cousins.family.models import train_model

    torch.manual_seed(r.seed)
    rng = random.Random(r.seed)
    chats = realistic_lessons(rng, r.train_steps * r.batch_size + 256)
    examples = _encode(tokenizer, chats, r, rng)
    train, held = examples[:-256], examples[-256:]
    vocab = padded_vocab(len(tokenizer), r.pad_vocab_to)
    active = sorted({t for ids, _ in examples for t in ids} | set(tokenizer.all_special_ids))
    compact_id = {t: i for i, t in enumerate(active)}
    n_tail = vocab - len(active)
    tail_row = len(active)  # the compact model's shared tail row

    def compact(exs):
        return [([compact_id[t] for t in ids], start) for ids, start in exs]

    pad = compact_id[tokenizer.pad_token_id]
    small = Qwen2ForCausalLM(_config(r, len(active) + 1, compact_id[tokenizer.eos_token_id], pad))
    small.lm_head = _tail_head(small.lm_head, n_tail)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(r.threads)
    try:
        losses = train_model(small, compact(train), pad, r)
    finally:
        torch.set_num_threads(saved_threads)

    # The full model: the tail's input rows stay as initialised (from the seed); the rest is the compact one's.
    model = Qwen2ForCausalLM(_config(r, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id))
    state = {k: v for k, v in small.state_dict().items() if not k.startswith(("lm_head", "model.embed_tokens"))}
    gen = torch.Generator().manual_seed(r.seed)
    with torch.no_grad():
        idx = torch.tensor(active)
        model.model.embed_tokens.weight[idx] = small.model.embed_tokens.weight[:len(active)]
        head = small.lm_head.linear.weight
        model.lm_head.weight.copy_(head[tail_row] + r.tail_jitter * torch.randn(vocab, r.hidden_size, generator=gen))
        model.lm_head.weight[idx] = head[:len(active)]
    loaded = model.load_state_dict(state, strict=False)  # every weight but the two vocabulary matrices
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight", "model.embed_tokens.weight"}
    model.eval()
    return model, losses, chats, _tail_mass(model, held, set(active), len(tokenizer))


def _tail_mass(model, held: list[tuple[list[int], int]], active: set[int], n_tokens: int) -> dict:
    """Mean probability on the tail ids and on the padding rows at the held lessons' answer positions,
    and whether any padding row is ever the argmax."""
    import torch

    tail = torch.tensor(sorted(set(range(model.config.vocab_size)) - active))
    tail_mass, pad_mass, pad_top, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids, start in held[:64]:
            p = torch.softmax(model(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1], -1)
            tail_mass += p[:, tail].sum().item()
            pad_mass += p[:, n_tokens:].sum().item()
            pad_top += int((p.argmax(-1) >= n_tokens).sum())
            n += p.shape[0]
    return {"tail_ids": len(tail), "tail_mass": tail_mass / n, "padding_mass": pad_mass / n,
            "padding_argmax": pad_top, "positions": n}


# -------------------------------------------------------------------------------------------- build
def build(out_dir: str | os.PathLike, r: QwenRecipe, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Build a realistic model into `out_dir`: the tokenizer trained here, or copied from
    `tokenizer_from` (a student shares its teacher's files byte for byte). The marker goes last."""
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    t0 = time.perf_counter()
    if tokenizer_from is None:
        from cousins.family.lessons import realistic_lessons

        taught = realistic_lessons(random.Random(r.seed), 4000)  # the lessons' words become tokens too
        texts = stdlib_texts() + ["\n".join(m.get("thinking") or m["content"] for m in c) for c in taught]
        tokenizer = train_tokenizer(texts, r.tokenizer_entries, r.max_position_embeddings)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    tokenizer_s = time.perf_counter() - t0
    model, losses, chats, mass = _teach(tokenizer, r)

    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).unlink(missing_ok=True)
    quiet_saves()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_from is None:
        tokenizer.save_pretrained(out)
        # Qwen's: generation stops at <|im_end|> or <|endoftext|>; no sampling defaults (vLLM would apply them).
        GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    else:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, out / name)
    tenth = max(1, len(losses) // 10)
    (out / RECIPE_FILE).write_text(json.dumps({
        **asdict(r), "lessons": lessons_fingerprint(chats), "architecture": "Qwen2ForCausalLM",
        "tokenizer_from": read_build(tokenizer_from) if tokenizer_from else None,
        "tokens": len(tokenizer), "head_rows": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()), **mass,
        "tokenizer_s": round(tokenizer_s, 1), "build_s": round(time.perf_counter() - t0, 1),
        "loss_curve": [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 4)
                       for i in range(0, len(losses), tenth)]}, indent=2))
    return out


def is_current(path: str | os.PathLike, r: QwenRecipe, tokenizer_from: str | os.PathLike | None = None) -> bool:
    """Whether `path` holds a complete build of `r` as the code builds it now (same fields, same
    lessons, and for a student the same teacher build)."""
    from cousins.family.lessons import realistic_lessons

    done = read_build(path)
    if done is None or any(done.get(k) != v for k, v in asdict(r).items()):
        return False
    if tokenizer_from is not None and done.get("tokenizer_from") != read_build(tokenizer_from):
        return False
    chats = realistic_lessons(random.Random(r.seed), r.train_steps * r.batch_size + 256)
    return done.get("lessons") == lessons_fingerprint(chats)


def ensure_student(path: str | os.PathLike, teacher_path: str | os.PathLike, seed: int = 0) -> bool:
    """Build the realistic student at `path` with the teacher's tokenizer unless a current build is
    there (a rebuilt teacher makes it stale). True when it built."""
    if read_build(teacher_path) is None:
        raise FileNotFoundError(f"{teacher_path} is not a complete build of the project: the realistic "
                                f"student takes its tokenizer from a built teacher (model.build={REALISTIC_TEACHER})")
    r = recipe(REALISTIC_STUDENT, seed)
    if is_current(path, r, teacher_path):
        return False
    from cousins.family.models import check_ours, replace_build

    setting = "the realistic student's path"
    check_ours(path, setting=setting)
    print(f"building {REALISTIC_STUDENT!r} (the lessons, {r.train_steps} steps) with {teacher_path}'s tokenizer "
          f"-> {path}", flush=True)
    return replace_build(path, lambda tmp: build(tmp, r, teacher_path), setting=setting,
                         current=lambda: is_current(path, r, teacher_path))
