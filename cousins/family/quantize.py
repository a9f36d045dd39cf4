"""Quantized cousins of an HF Llama checkpoint, built offline and deterministically.

Three families of recipe:

* ``rtn-int8`` / ``rtn-int4`` — round-to-nearest **fake-quant**. Every Linear weight of the decoder
  layers (q/k/v/o/gate/up/down projections; not embeddings, lm_head or norms) is rounded to a
  symmetric per-output-channel grid, ``scale = max|w_row| / qmax`` with ``qmax = 2**(bits-1) - 1``
  (int8: 255 levels in [-127, 127]; int4: 15 levels in [-7, 7]), and stored back dequantized in the
  source dtype. vLLM loads the result as an ordinary unquantized model: the checkpoint carries the
  rounding error of the quantizer but none of its kernels, and says so (``cousins_fake_quant`` in
  config.json, ``fake_quant: true`` in the marker). Every other tensor is copied bit for bit.

* ``w8a8-int8`` / ``fp8-dynamic`` — real compressed-tensors checkpoints, written with the
  ``compressed_tensors`` library's own preset schemes (``W8A8``, ``FP8_DYNAMIC``), the way
  llmcompressor's ``QuantizationModifier(targets="Linear", scheme=..., ignore=["lm_head"])`` writes
  them: weights per-channel symmetric with min-max scales (no calibration data needed: activations
  are quantized dynamically per token at run time), then ``ModelCompressor`` packs and annotates
  them. Note the library's int8 grid is ``scale = max|w| / 127.5`` clamped to [-128, 127] (its
  ``calculate_qparams``), not the ``/127`` of the fake-quant recipes; fp8 uses ``max|w| / 448``.

* ``llmc-*`` — llm-compressor's own ``oneshot`` (W8A8, FP8_DYNAMIC, W4A16 by round-to-nearest,
  GPTQ and AWQ), run in its own venv by cousins/family/llmc.py, calibrated on a few lessons.

``build_quantized`` writes into a temporary sibling directory and renames it into place; the
``cousins_recipe.json`` marker is written last, so a directory that has it is a complete build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from cousins.family.models import RECIPE_FILE, check_ours, replace_build
from cousins.contract.recipes import QUANT_RECIPES
from cousins.family.progress import quiet_saves

RECIPES = QUANT_RECIPES  # name -> what it does (declared in cousins/contract/recipes.py)

# recipe -> (kind, bits or compressed-tensors preset, dtype to serve it with in vLLM on CPU)
_SPECS: dict[str, tuple[str, int | str, str]] = {
    "rtn-int8": ("rtn", 8, "float32"),
    "rtn-int4": ("rtn", 4, "float32"),
    "w8a8-int8": ("compressed-tensors", "W8A8", "float32"),
    "fp8-dynamic": ("compressed-tensors", "FP8_DYNAMIC", "float32"),
    "llmc-w8a8-int8": ("llmcompressor", "llmc-w8a8-int8", "float32"),
    "llmc-fp8-dynamic": ("llmcompressor", "llmc-fp8-dynamic", "float32"),
    # vLLM's CPU int4 kernel (cpu_gemm_wna16) takes bfloat16/float16 activations only (cousins/engine/formats.py).
    "llmc-w4a16": ("llmcompressor", "llmc-w4a16", "bfloat16"),
    "llmc-gptq-w4a16": ("llmcompressor", "llmc-gptq-w4a16", "bfloat16"),
    "llmc-awq-w4a16": ("llmcompressor", "llmc-awq-w4a16", "bfloat16"),
    "llmc-w8a16": ("llmcompressor", "llmc-w8a16", "bfloat16"),  # GPU engines only
}

# The decoder-layer Linear weights the fake-quant recipes round.
LINEAR_WEIGHT = re.compile(
    r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
# Files a model directory carries besides its weights (tokenizer, chat template, generation config).
_AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
              "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------------------------------------- RTN
def rtn_scales(weight, bits: int):
    """Per-output-channel (per-row) symmetric scales, shape (rows, 1): max|w_row| / (2**(bits-1) - 1).

    An all-zero row gets scale 1 (any positive value maps it to zeros)."""
    import torch

    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.reshape(weight.shape[0], -1) if weight.ndim != 2 else weight
    amax = w.abs().amax(dim=1, keepdim=True).to(torch.float32)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def rtn_quantize(weight, bits: int):
    """Integer codes and scales: ``codes`` in [-qmax, qmax] (int8 tensor), ``scales`` (rows, 1) fp32.

    Rounding is ``torch.round`` (half to even), so the result is deterministic."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    scales = rtn_scales(weight, bits)
    codes = torch.clamp(torch.round(weight.to(torch.float32) / scales), -qmax, qmax).to(torch.int8)
    return codes, scales


def rtn_fake_quant(weight, bits: int):
    """Round ``weight`` (2-D, rows = output channels) to its per-row symmetric ``bits`` grid and
    return it dequantized in the input dtype. |result - weight| <= scale/2 per element (up to float
    rounding); zeros stay zero; at most 2**bits - 1 distinct values per row."""
    codes, scales = rtn_quantize(weight, bits)
    return (codes.to(scales.dtype) * scales).to(weight.dtype)


def _build_rtn(src: Path, out: Path, bits: int) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    rounded: list[str] = []
    for shard in shards:
        tensors, metadata = {}, None
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                t = f.get_tensor(name)
                if LINEAR_WEIGHT.search(name) and t.ndim == 2 and t.is_floating_point():
                    t = rtn_fake_quant(t, bits)
                    rounded.append(name)
                tensors[name] = t.contiguous()
        save_file(tensors, str(out / shard.name), metadata=metadata or {"format": "pt"})
    if not rounded:
        raise ValueError(f"no decoder Linear weights matched in {src}")
    for index in src.glob("*.safetensors.index.json"):
        shutil.copy2(index, out / index.name)
    cfg = json.loads((src / "config.json").read_text())
    if "quantization_config" in cfg:
        raise ValueError(f"{src} is already quantized; fake-quant needs a dense source")
    cfg["cousins_fake_quant"] = {
        "method": "round-to-nearest fake-quant (weights stored dequantized; no quantized kernels)",
        "bits": bits, "symmetric": True, "granularity": "per-output-channel",
        "scale": f"max|w_row| / {2 ** (bits - 1) - 1}", "tensors": len(rounded),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"fake_quant": True, "bits": bits, "rounded_tensors": rounded}


# ------------------------------------------------------------------------------ compressed-tensors
def _build_compressed(src: Path, out: Path, preset: str) -> dict:
    """What llmcompressor's oneshot(QuantizationModifier(targets="Linear", scheme=preset,
    ignore=["lm_head"])) does for weight-only-calibrated presets, with the library's own pieces:
    apply the preset, set min-max weight qparams (its memoryless min-max observer), compress, save."""
    import compressed_tensors
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    model.eval()
    qconfig = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                 ignore=["lm_head"])
    apply_quantization_config(model, qconfig)
    n = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            if not is_module_quantized(module):
                continue
            args = module.quantization_scheme.weights
            w = module.weight
            scale, zp = calculate_qparams(w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True), args)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zp.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
            n += 1
    if n == 0:
        raise ValueError(f"no Linear layers to quantize in {src}")
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    quiet_saves()
    model.save_pretrained(str(out), safe_serialization=True)
    compressor.update_config(str(out))
    return {"fake_quant": False, "compressed_tensors_preset": preset,
            "compressed_tensors_version": compressed_tensors.__version__,
            "format": compressor.quantization_config.format, "quantized_modules": n}


# -------------------------------------------------------------------------------------------- build
def _build(kind: str, arg: int | str, src: Path, out: Path) -> dict:
    if kind == "rtn":
        return _build_rtn(src, out, int(arg))
    if kind == "compressed-tensors":
        return _build_compressed(src, out, str(arg))
    from cousins.family import llmc  # llm-compressor's oneshot, in its own venv

    return {"fake_quant": False, **llmc.build(src, out, str(arg))}


def read_recipe(path: str | os.PathLike) -> dict | None:
    """The marker of a complete build at `path`, or None."""
    marker = Path(path) / RECIPE_FILE
    return json.loads(marker.read_text()) if marker.exists() else None


def is_current(out_dir: str | os.PathLike, src_dir: str | os.PathLike, recipe: str) -> bool:
    """Whether `out_dir` holds a complete `recipe` build of the model now at `src_dir` (the source's
    own marker unchanged: a rebuilt original makes its cousins stale)."""
    done = read_recipe(out_dir)
    return (done is not None and done.get("recipe") == recipe and done.get("source") == str(Path(src_dir).resolve())
            and done.get("source_recipe") == read_recipe(src_dir))


def build_quantized(src_dir: str | os.PathLike, out_dir: str | os.PathLike, recipe: str, *,
                    setting: str = "the cousin's path") -> Path:
    """Build the `recipe` cousin of the HF model at `src_dir` into `out_dir` and return `out_dir`.

    Idempotent: a complete build of the same recipe from the same source build (is_current) at
    `out_dir` is returned as is; a build from another source or an older build of it is replaced. The build goes to
    a temporary sibling directory that is renamed into place; the marker is written last."""
    if recipe not in RECIPES:
        raise KeyError(f"unknown quantization recipe {recipe!r}; known: {sorted(RECIPES)}")
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if is_current(out, src, recipe):
        return out
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"model directory not found: {src} has no config.json")
    check_ours(out, setting=setting)

    kind, arg, vllm_dtype = _SPECS[recipe]

    def build(tmp: Path) -> None:
        info = _build(kind, arg, src, tmp)
        for name in _AUX_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        marker = {"recipe": recipe, "description": RECIPES[recipe], "kind": kind, "source": str(src),
                  "source_recipe": read_recipe(src), "vllm_dtype": vllm_dtype,
                  **{k: v for k, v in info.items() if k != "rounded_tensors"}}
        (tmp / RECIPE_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    replace_build(out, build, setting=setting, current=lambda: is_current(out, src, recipe))
    return out
