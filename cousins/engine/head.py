"""A model's output head applied by us, to the final hidden states vLLM returns (drift.kld=exact on the
`hidden` route: cousins/engine/kld_actor.py). Torch and safetensors only; no vLLM import.

vLLM hands full-vocabulary logprobs over as Python lists (~62 ms and ~20 MiB per position per
engine at a 152k vocabulary: docs/benchmarks.md). Its pooling runner instead returns each
position's final hidden state (after the last norm, as the model's own quantized kernels computed
it), a few KiB a position. The head is then one matmul: logits = h · Wᵀ (+ bias), the
architecture's own transforms, and each KL straight from the logits in float64 (reduce_logits;
cousins/drift/vocab_kld.py's reduction where a chunk holds anything non-finite).

What is applied, as vLLM's `LogitsProcessor` does it:
- the head's weight: `lm_head.weight`, or the input embedding when the config ties them
  (`tie_word_embeddings`, or a checkpoint that stores no head);
- a bias (`lm_head.bias`) where the checkpoint has one;
- final logit soft-capping (Gemma 2/3: `final_logit_softcapping`): cap · tanh(logits / cap);
- logit scaling: `logit_scale` (Cohere, some Llamas) multiplies, `logits_scaling` (Granite)
  divides, `lm_head_multiplier` (Falcon-H1) multiplies.
The matmul runs in the engine's dtype (bf16 engines round logits to bf16 as vLLM's own head does);
everything after it in float64.

What is refused, with the reason (the exact pass then takes vLLM's lists: `head_problem`, decided
before Ray starts): a quantized head (compressed-tensors without `lm_head` in `ignore`, GPTQ's
`lm_head: true`, or a head stored packed or in int8/fp8), a head transform this module does not
know (MiniCPM's `dim_model_base`), code from the model's repository (`trust_remote_code`), GGUF
files, a local checkpoint without safetensors files, and a LoRA adapter served unmerged (it may
change the head; a merged one is in the weights). vLLM's online quantization (`quantization=` on
an unquantized checkpoint) quantizes linear layers, not the head: such a cousin's head is its
checkpoint's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from cousins.drift.vocab_kld import Exact, PositionError, reduce_dense

# config keys that change the head's output in ways this module does not apply
UNKNOWN_TRANSFORMS = {"dim_model_base": "MiniCPM divides the hidden state by hidden_size / dim_model_base",
                      "scale_width": "MiniCPM divides the hidden state by its scale_width"}
QUANTIZED_PARTS = ("weight_packed", "qweight", "weight_scale", "scales", "qzeros", "weight_zero_point", "g_idx",
                   "SCB", "weight_shape")
# float64 cells of one (positions, head width) array of a chunk: 16 MiB (13 positions at 152k); a
# reduction holds about ten such arrays at once
CHUNK_CELLS = 1 << 21
# cells (positions x head width) of one matmul's output, in the head's dtype: 64 MiB of float32, 110
# positions at 152k. A matmul of few positions is bound by reading the head's weight (545 MB for
# 152k x 896 in float32): 13 positions at a time ran at 28 GFLOP/s here, 128 at 96.
BLOCK_CELLS = 1 << 24


class HeadError(ValueError):
    """The head cannot be applied outside vLLM (the exact pass takes vLLM's lists for this pair)."""


def head_problem(config: dict, *, trust_remote_code: bool = False, gguf: bool = False,
                 lora_served: bool = False, path: str | None = None) -> str | None:
    """Why a model's head cannot be applied to its hidden states by us (None: it can), from its
    config.json and how it is run; `path`, where the checkpoint is a local directory."""
    if path is not None and os.path.isdir(path) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
        return "its weights are not in safetensors files (the head is read from them)"
    if gguf:
        return "a GGUF model (its head is inside the GGUF file)"
    if trust_remote_code:
        return "the model runs code from its repository (trust_remote_code): its head may do anything"
    if lora_served:
        return "a LoRA adapter served unmerged (lora_mode=serve) may change the head"
    for k, why in UNKNOWN_TRANSFORMS.items():
        if config.get(k) is not None:
            return f"its head transform is not one this route applies ({k}: {why})"
    q = config.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors" and q.get("config_groups"):
        ignore = [str(x) for x in q.get("ignore") or []]
        if not any(x == "lm_head" or x.endswith(".lm_head") or (x.startswith("re:") and "lm_head" in x)
                   for x in ignore):
            return "its head is quantized (compressed-tensors without lm_head in ignore)"
    if q.get("lm_head") is True:
        return f"its head is quantized ({method or 'quantization_config'} lm_head: true)"
    return None


def _transforms(config: dict) -> tuple[float | None, float]:
    """(soft cap or None, scale) of the logits, from the config."""
    cap = config.get("final_logit_softcapping")
    scale = 1.0
    for k in ("logit_scale", "lm_head_multiplier"):
        if config.get(k) is not None:
            scale *= float(config[k])
    if config.get("logits_scaling") is not None:
        scale /= float(config["logits_scaling"])
    return (float(cap) if cap else None), scale


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, from the index or the files' headers."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    out: dict[str, str] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update((k, os.path.join(path, name)) for k in f.keys())
    if not out:
        raise HeadError(f"{path}: no safetensors weights to read the head from")
    return out


def _pick(names: dict[str, str], suffix: str) -> str | None:
    hits = sorted((k for k in names if k == suffix or k.endswith("." + suffix)), key=len)
    return hits[0] if hits else None


@dataclass
class Head:
    """A head ready to apply: weight (W, H) on its device in the engine's dtype, optional bias,
    soft cap and scale."""

    weight: object  # torch.Tensor (torch is imported where a head is made, never by the driver)
    bias: object | None = None
    soft_cap: float | None = None
    scale: float = 1.0

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def logprobs(self, hidden):
        """(C, W) float64 log-probabilities of positions' hidden states (C, H), a torch tensor."""
        import torch

        return torch.log_softmax(self.logits(hidden), dim=-1)

    def logits(self, hidden):
        """(C, W) float64 logits of positions' hidden states (C, H): the matmul in the head's dtype
        (as vLLM's), the transforms in float64."""
        return self.finish(self.matmul(hidden))

    def matmul(self, hidden):
        """h · Wᵀ (+ bias) in the head's dtype, as vLLM's head computes it (one matmul for many
        positions: the weight is read from memory once per call, whatever the number of rows)."""
        import torch

        h = hidden.to(device=self.weight.device, dtype=self.weight.dtype)
        out = torch.nn.functional.linear(h, self.weight)
        return out if self.bias is None else out + self.bias

    def finish(self, raw):
        """matmul's output as float64 logits, the head's transforms applied."""
        import torch

        logits = raw.double()
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits


def load_head(path: str, config: dict, dtype, device: str = "cpu") -> Head:
    """The head of the local checkpoint at `path` (config.json's `config`) in torch `dtype` on
    `device`, as vLLM applies it; raises HeadError for a head this route cannot apply (see
    head_problem, checked again on the tensors)."""
    import torch
    from safetensors import safe_open

    problem = head_problem(config)
    if problem:
        raise HeadError(problem)
    names = _tensor_files(path)
    packed = sorted(k for k in names if any(k.endswith(f"lm_head.{x}") for x in QUANTIZED_PARTS))
    if packed:
        raise HeadError(f"its head is stored quantized ({', '.join(packed)})")
    own = _pick(names, "lm_head.weight")
    tied = config.get("tie_word_embeddings")
    key = own if own is not None and tied is not True else None
    if key is None and (tied is True or (own is None and tied is None)):
        key = next((k for k in map(lambda x: _pick(names, x), ("embed_tokens.weight", "wte.weight",
                                                                 "word_embeddings.weight")) if k), None)
    if key is None:
        raise HeadError(f"{path}: no lm_head.weight (and the config does not tie the head to the embedding)")
    stem = key[:-len("weight")]
    if any(k.startswith(stem) and k[len(stem):] in QUANTIZED_PARTS for k in names):
        raise HeadError(f"its head is stored quantized (beside {key})")
    with safe_open(names[key], "pt") as f:
        weight = f.get_tensor(key)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise HeadError(f"its head is stored as {weight.dtype} (quantized): {key}")
    bias = None
    if key.endswith("lm_head.weight") and (stem + "bias") in names:
        with safe_open(names[stem + "bias"], "pt") as f:
            bias = f.get_tensor(stem + "bias").to(device=device, dtype=dtype)
    cap, scale = _transforms(config)
    return Head(weight=weight.to(device=device, dtype=dtype), bias=bias, soft_cap=cap, scale=scale)


def exact_from_hidden(hp, hq, head_p: Head, head_q: Head, vocab: int, chunk_cells: int = CHUNK_CELLS) -> Exact:
    """KL(p ‖ q), KL(q ‖ p) and the tail mass at the positions whose final hidden states are `hp`
    (the original's, (n, Hp)) and `hq` (the cousin's, (n, Hq)); PositionError (counted from the
    first row) at the first position that cannot give a finite KLD. One row of exact_rows."""
    out = exact_rows([hp], [hq], head_p, head_q, vocab, chunk_cells)[0]
    if isinstance(out, PositionError):
        raise out
    return out


def exact_rows(hps: list, hqs: list, head_p: Head, head_q: Head, vocab: int, chunk_cells: int = CHUNK_CELLS,
               block_cells: int = BLOCK_CELLS) -> list:
    """Per row, Exact or the PositionError of its first position that cannot give a finite KLD:
    rows of final hidden states, the original's `hps[i]` (n_i, Hp) and the cousin's `hqs[i]`
    (n_i, Hq). Each model's head is applied to a block of positions across rows at a time (one
    matmul: BLOCK_CELLS), and the logits reduced a chunk of one row's positions at a time
    (CHUNK_CELLS, float64, on the heads' device) over the vocabulary [0, vocab)."""
    import torch

    width = max(head_p.width, head_q.width)
    size = max(1, chunk_cells // width)
    out: list = [None] * len(hps)
    segments = []  # (row, first position in the row, end), a chunk each, never across rows
    for r, (p, q) in enumerate(zip(hps, hqs)):
        n = int(p.shape[0])
        if int(q.shape[0]) != n:
            out[r] = PositionError(0, f"the engines returned {n} and {int(q.shape[0])} hidden states for one row")
            continue
        segments += [(r, s, min(n, s + size)) for s in range(0, n, size)]
    parts: dict[int, list] = {r: [] for r in range(len(hps)) if out[r] is None}
    per_block = max(size, block_cells // width)
    at = 0
    while at < len(segments):
        block, total = [], 0
        while at < len(segments) and (not block or total + segments[at][2] - segments[at][1] <= per_block):
            block.append(segments[at])
            total += segments[at][2] - segments[at][1]
            at += 1
        raw = [head.matmul(torch.cat([h[r][s:e] for r, s, e in block]))
               for head, h in ((head_p, hps), (head_q, hqs))]
        o = 0
        for r, s, e in block:
            if out[r] is None:
                try:
                    parts[r].append(reduce_logits(head_p.finish(raw[0][o:o + e - s]),
                                                  head_q.finish(raw[1][o:o + e - s]), vocab, s))
                except PositionError as err:
                    out[r] = err
            o += e - s
        del raw
    for r, got in parts.items():
        if out[r] is None:
            out[r] = Exact(*(np.concatenate([getattr(x, k) for x in got]) if got else np.zeros(0)
                             for k in ("kld", "rkld", "tail_mass")))
    return out


def reduce_logits(xp, xq, vocab: int, first: int) -> Exact:
    """reduce_dense's figures from two chunks of float64 logits ((C, Wp), (C, Wq)) in a third of its
    passes over the vocabulary. Per model one exponential e = exp(x − max), its sum s and its tail's
    sum; log Z = max + log s; then each KL is two dot products over the ids < V,
        Σ p·(log p − log q) = (e·x_p − e·x_q) / s − P_V · (log Z_p − log Z_q),
    P_V the model's mass below V, plus the tail bucket's term. There is no mass to check: the
    distributions are normalised by construction. A padded head against one exactly V wide is
    renormalised over V (its normaliser is its mass below V), as reduce_dense does. A chunk with
    anything non-finite (a NaN or infinite logit, a tail one model gives probability 0 that the
    other does not) goes through reduce_dense, which names the position and the problem: the same
    error rows as the lists route."""
    import torch

    # a head narrower than the vocabulary: the ids it lacks have probability 0 (as reduce_dense reads them)
    xp, xq = (x if x.shape[1] >= vocab else torch.nn.functional.pad(x, (0, vocab - x.shape[1]), value=-float("inf"))
              for x in (xp, xq))

    def side(x):
        m = x.amax(dim=1)
        e = (x - m[:, None]).exp_()
        total = e.sum(dim=1)
        tail = e[:, vocab:].sum(dim=1) if x.shape[1] > vocab else torch.zeros_like(total)
        return m, e, total, tail

    (mp, ep, sp, tp), (mq, eq, sq, tq) = side(xp), side(xq)
    tails = torch.maximum(tp / sp, tq / sq)
    both = (xp.shape[1] > vocab) == (xq.shape[1] > vocab)
    norm_p, norm_q = (sp, sq) if both else (sp - tp, sq - tq)  # one padded: renormalised over V
    lzp, lzq = mp + torch.log(norm_p), mq + torch.log(norm_q)
    pv, qv = (sp - tp) / norm_p, (sq - tq) / norm_q

    def dot(a, b):
        return torch.einsum("ij,ij->i", a, b)

    a, b, ea, eb = xp[:, :vocab], xq[:, :vocab], ep[:, :vocab], eq[:, :vocab]
    kld = (dot(ea, a) - dot(ea, b)) / norm_p - pv * (lzp - lzq)
    rkld = (dot(eb, b) - dot(eb, a)) / norm_q - qv * (lzq - lzp)
    if both and xp.shape[1] > vocab:  # the tail buckets: p_t (log p_t − log q_t), and the other way
        pt, qt = tp / sp, tq / sq
        lpt, lqt = torch.log(tp) + mp - lzp, torch.log(tq) + mq - lzq
        kld = kld + torch.where(pt > 0, pt * (lpt - lqt), torch.zeros_like(pt))
        rkld = rkld + torch.where(qt > 0, qt * (lqt - lpt), torch.zeros_like(qt))
    if not (bool(torch.isfinite(kld).all()) and bool(torch.isfinite(rkld).all())):
        return reduce_dense(torch.log_softmax(xp, dim=-1), torch.log_softmax(xq, dim=-1), vocab, first)
    kld, rkld, tails = (x.cpu().numpy() for x in (kld, rkld, tails))
    return Exact(kld=np.where(kld < 0.0, 0.0, kld), rkld=np.where(rkld < 0.0, 0.0, rkld), tail_mass=tails)
