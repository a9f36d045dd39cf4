"""cousins/engine/vllm_fixes.py: each fix applies to the vLLM this project pins, in its own processes
(the plugin entry point) and in the engine actors, and corrects what it says. The engines that need
them run in test_quantize.py (the W8A8 cousin in float32) and test_realistic.py (llm-compressor's)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import torch

from cousins.engine import vllm_fixes


def test_the_fixes_are_a_vllm_plugin_and_apply_to_the_pinned_vllm():
    from vllm.platforms import current_platform

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("cousins_fixes") == "cousins.engine.vllm_fixes:register"
    on_cpu = current_platform.is_cpu()
    # the CPU kernel choice it corrects is still the one it knows (a vLLM upgrade that moves it fails here)
    assert vllm_fixes.apply() == {"int8_amx_float32": on_cpu}
    if on_cpu:
        kernels = importlib.import_module(vllm_fixes.INT8_KERNELS)
        assert kernels.check_cpu_sgl_kernel.cousins_fix
        vllm_fixes.register()  # again (vLLM may run it more than once in a process): wrapped once
        assert kernels.check_cpu_sgl_kernel.__wrapped__ is not None
        assert not getattr(kernels.check_cpu_sgl_kernel.__wrapped__, "cousins_fix", False)


def test_int8_weights_take_the_amx_kernel_only_in_a_bf16_or_fp16_model():
    asked = []

    def check(n, k, dtype):  # vLLM's own: AMX present and the shape fits
        asked.append(dtype)
        return True

    fixed = vllm_fixes._int8_amx_needs_half(check)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)  # vLLM loads a model under its dtype as the default
        assert fixed(64, 64, torch.int8) is False and asked == []
        assert fixed(64, 64, torch.bfloat16) is True  # unquantized weights: vLLM's own choice
        for half in (torch.bfloat16, torch.float16):
            torch.set_default_dtype(half)
            assert fixed(64, 64, torch.int8) is True
    finally:
        torch.set_default_dtype(before)
    assert asked == [torch.bfloat16, torch.int8, torch.int8]
