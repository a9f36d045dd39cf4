"""Checkpoints in the forms users bring, made from the tiny teacher: a LoRA adapter in PEFT's
layout (and the same weights merged, its reference), a Hugging Face hub cache holding a model
under an owner/name id at a commit, as `huggingface_hub` lays it out (tests never reach the hub)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

LORA_TARGETS = ("q_proj", "v_proj", "down_proj")


def make_lora(base: str | Path, out: str | Path, *, rank: int = 8, alpha: int = 16, seed: int = 0,
              scale: float = 0.05, merged: str | Path | None = None) -> Path:
    """A random LoRA adapter of `base` (a Llama) in PEFT's layout: adapter_config.json and
    adapter_model.safetensors with lora_A (r x in) and lora_B (out x r) per target module. With
    `merged`, also the base with W + alpha/r * B @ A written there: what serving the adapter must equal."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if not name.endswith(LORA_TARGETS) or not isinstance(module, torch.nn.Linear):
            continue
        a = torch.randn(rank, module.in_features, generator=g) * scale
        b = torch.randn(module.out_features, rank, generator=g) * scale
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        if merged is not None:
            with torch.no_grad():
                module.weight += (alpha / rank) * (b @ a)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "modules_to_save": None, "base_model_name_or_path": str(base)}, indent=2))
    if merged is not None:
        merged = Path(merged)
        model.save_pretrained(merged, safe_serialization=True)
        for f in Path(base).iterdir():
            if f.name.startswith(("tokenizer", "chat_template")) or f.name in ("special_tokens_map.json",
                                                                           "generation_config.json"):
                shutil.copy2(f, merged / f.name)
    return out


def hub_cache(hf_home: str | Path, repo_id: str, src: str | Path, *, branch: str = "main",
              tag: str | None = None) -> str:
    """Put the model directory `src` into a Hugging Face cache under `hf_home` as `repo_id` at a
    made-up commit (blobs, a snapshot of links, refs/{branch} and refs/{tag}: the cache keeps a
    ref per revision name asked for); the commit."""
    src = Path(src)
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    commit = hashlib.sha1(json.dumps([[p.name, p.stat().st_size] for p in files]).encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.name
        if not link.exists():
            link.symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    if tag:
        (repo / "refs" / tag).write_text(commit)
    return commit
