"""Pre-quantized checkpoint formats: what a checkpoint's config.json says it is, and which of them
vLLM's CPU build cannot run (4-bit weight-only kernels need AVX512; DESIGN.md's machine facts)."""

from __future__ import annotations


def quantization_of(config: dict) -> dict | None:
    """{method, weight_bits, activation_bits} from config.json's quantization_config, or None."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or q.get("quantization_method") or "unknown").lower()
    wbits = q.get("bits") or q.get("w_bit")
    abits = None
    for group in (q.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        wbits = w.get("num_bits", wbits)
        abits = a.get("num_bits") if a else abits
    return {"method": method, "weight_bits": wbits, "activation_bits": abits}


def cpu_refusal(config: dict) -> str | None:
    """Why vLLM's CPU build cannot run this checkpoint, and what to do; None when it can."""
    q = quantization_of(config)
    if q is None:
        return None
    if q["weight_bits"] == 4 and q["activation_bits"] is None:
        return (f"a {q['method']} checkpoint with 4-bit weights and unquantized activations: vLLM's CPU build "
                f"runs no 4-bit weight-only kernels on this CPU (they need AVX512); run it on GPU engines "
                f"(engine.gpus_per_actor=1 in its engine block)")
    return None
