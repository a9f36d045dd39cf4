"""Fixes for vLLM defects that make an engine fail where it should run. Each is applied in every
process that builds a model: the engine actors call `apply()` before their first engine, and vLLM
runs it in its own processes (an engine core or worker of its own, `vllm serve`) as a general
plugin (the `vllm.general_plugins` entry point in pyproject.toml). Each fix checks that the code it
corrects is the code it knows, and leaves any other vLLM alone.

- **W8A8 int8 on a CPU with AMX, in float32** (vLLM 0.32). vLLM's CPU int8 kernel sends int8
  weights of suitable shapes to its AMX kernel (`int8_scaled_mm_with_quant`) whatever the
  activations' dtype; that kernel takes bf16/fp16 activations only, so a float32 engine of a
  compressed-tensors W8A8 checkpoint loads and then fails its first forward pass ("expect A to be
  bfloat16 or half"): every row of that model an error row, on Sapphire Rapids and newer Xeons and
  not on CPUs without AMX. A float32 engine now gets vLLM's oneDNN int8 kernel, as it does on those
  CPUs; bf16 and fp16 engines keep the AMX kernel.
"""

from __future__ import annotations

INT8_KERNELS = "vllm.model_executor.kernels.linear.scaled_mm.cpu"


def _int8_amx_needs_half(check):
    """`check_cpu_sgl_kernel` refusing int8 weights while the model's dtype (the default dtype
    while vLLM loads and prepares a model) is not bf16 or fp16."""
    import torch

    def check_cpu_sgl_kernel(n: int, k: int, dtype) -> bool:
        if dtype == torch.int8 and torch.get_default_dtype() not in (torch.bfloat16, torch.float16):
            return False
        return check(n, k, dtype)

    check_cpu_sgl_kernel.cousins_fix = True
    check_cpu_sgl_kernel.__wrapped__ = check
    return check_cpu_sgl_kernel


def _fix_int8_amx_float32() -> bool:
    import importlib
    import inspect

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    try:
        mod = importlib.import_module(INT8_KERNELS)
    except ImportError:  # another vLLM: the kernels live elsewhere
        return False
    check = getattr(mod, "check_cpu_sgl_kernel", None)
    kernel = getattr(mod, "CPUInt8ScaledMMLinearKernel", None)
    if getattr(check, "cousins_fix", False):
        return True  # applied already (vLLM ran the plugin in this process)
    if check is None or kernel is None:
        return False
    try:  # the kernel choice this corrects: check_cpu_sgl_kernel(N, K, <the weight's dtype>)
        known = "check_cpu_sgl_kernel(N, K, dtype)" in inspect.getsource(kernel.process_weights_after_loading)
    except (OSError, TypeError):
        known = False
    if not known:
        return False
    mod.check_cpu_sgl_kernel = _int8_amx_needs_half(check)
    return True


_APPLIED: dict[str, bool] = {}


def apply() -> dict[str, bool]:
    """Apply every fix in this process (once); returns which applied."""
    if not _APPLIED:
        _APPLIED["int8_amx_float32"] = _fix_int8_amx_float32()
    return dict(_APPLIED)


def register() -> None:
    """vLLM's general-plugin hook (run by vLLM in each of its processes)."""
    apply()
