"""Tiny models the project builds itself, offline and deterministically from a seed.

The tiny teacher is a 2-layer Llama (~1M parameters, fp32) with a byte-level BPE tokenizer trained
on this machine's Python standard library and a chat template. It is then trained for a few hundred
steps on chat-shaped snippets of the same text, so that its distributions are peaked the way a real
model's are (an untrained model's near-uniform logits make every top-k a near-tie) and so that it
learns to end its answers with the end-of-turn token.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from cousins.recipes import TINY_TEACHER

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "<|bos|>"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RECIPE_FILE = "cousins_recipe.json"  # written last: a directory with it is a complete build


@dataclass(frozen=True)
class TinyLlamaRecipe:
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2  # head_dim 64: a size every vLLM attention backend supports
    max_position_embeddings: int = 1024
    corpus_files: int = 400  # stdlib files the tokenizer and the model see
    train_steps: int = 150
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3


RECIPES = {TINY_TEACHER: TinyLlamaRecipe()}


def _stdlib_texts(n_files: int) -> list[str]:
    """The first `n_files` .py files of the stdlib in sorted order: present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:n_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _chat_examples(texts: list[str], rng: random.Random, n: int) -> list[list[dict]]:
    """Chat-shaped training snippets: a few lines of code as the question, the next ones as the answer."""
    examples = []
    for _ in range(n):
        lines = [ln for ln in rng.choice(texts).splitlines() if ln.strip()]
        if len(lines) < 8:
            continue
        i = rng.randrange(0, len(lines) - 6)
        q, a = "\n".join(lines[i:i + rng.randint(1, 3)]), "\n".join(lines[i + 3:i + 3 + rng.randint(1, 4)])
        examples.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return examples


def _train_tokenizer(texts: list[str], recipe: TinyLlamaRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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

    out = Path(out_dir)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    texts = _stdlib_texts(recipe.corpus_files)
    tokenizer = _train_tokenizer(texts, recipe)

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
    _train(model, tokenizer, texts, rng, recipe)

    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / RECIPE_FILE).write_text(json.dumps({**asdict(recipe), "parameters": n_params}, indent=2))
    return out


def _train(model, tokenizer, texts: list[str], rng: random.Random, recipe: TinyLlamaRecipe) -> None:
    import torch

    if recipe.train_steps <= 0:
        return
    examples = _chat_examples(texts, rng, recipe.train_steps * recipe.batch_size)
    ids = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=False) for m in examples]
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    for step in range(recipe.train_steps):
        batch = ids[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        if not batch:
            break
        length = min(recipe.seq_len, max(len(x) for x in batch))
        x = torch.full((len(batch), length), pad, dtype=torch.long)
        for i, seq in enumerate(batch):
            seq = list(seq)[:length]
            x[i, :len(seq)] = torch.tensor(seq)
        labels = x.masked_fill(x == pad, -100)
        loss = model(input_ids=x, attention_mask=(x != pad).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def ensure_model(path: str, recipe_name: str | None, seed: int = 0) -> None:
    """Build the model at `path` from its recipe unless a complete build is there.

    A build goes to a temporary directory and is renamed into place, so a killed build leaves
    nothing that looks complete.
    """
    if recipe_name is None:
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"model directory not found: {path!r} has no config.json (set model.path)")
        return
    if (Path(path) / RECIPE_FILE).exists():
        return
    recipe = TinyLlamaRecipe(**{**asdict(RECIPES[recipe_name]), "seed": seed})
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_llama(tmp, recipe)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
