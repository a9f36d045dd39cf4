"""Quantized cousins: the RTN rounding math, the checkpoints build_quantized writes, and (integration)
that vLLM on this CPU loads and greedy-generates with each of them."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import hide_context_proxies
from cousins.family.models import RECIPE_FILE
from cousins.family.quantize import LINEAR_WEIGHT, RECIPES, build_quantized, read_recipe, rtn_fake_quant, rtn_scales

PROMPTS = ["def main(", "import os\n", "class Foo:", "for i in range("]
# The recipes written here; llm-compressor's (llmc-*) are tested on the realistic teacher in
# tests/test_realistic.py, all from one oneshot subprocess.
OWN_RECIPES = sorted(r for r in RECIPES if not r.startswith("llmc-"))


def _weight(rows=16, cols=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[3] = 0.0  # an all-zero row
    w[5, ::7] = 0.0  # scattered zeros
    return w


@pytest.mark.parametrize("bits, levels", [(8, 255), (4, 15)])
def test_rtn_grid(bits, levels):
    w = _weight()
    q = rtn_fake_quant(w, bits)
    assert q.dtype == w.dtype and q.shape == w.shape
    for row in q:
        assert len(torch.unique(row)) <= levels
    scale = rtn_scales(w, bits)
    amax = w.abs().amax(1)
    assert torch.equal(scale.squeeze(1), torch.where(amax > 0, amax / (2 ** (bits - 1) - 1), 1.0))
    assert ((q - w).abs() <= scale / 2 * (1 + 1e-6) + 1e-12).all()
    assert (q[w == 0] == 0).all() and (q[3] == 0).all()
    # the row maximum is on the grid exactly (up to float rounding)
    torch.testing.assert_close(q.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)
    assert torch.equal(q, rtn_fake_quant(w.clone(), bits))  # deterministic


def test_rtn_int4_coarser_than_int8():
    w = _weight(seed=1)
    err8 = (rtn_fake_quant(w, 8) - w).abs().mean()
    err4 = (rtn_fake_quant(w, 4) - w).abs().mean()
    assert 0 < err8 < err4


def test_linear_weight_pattern():
    assert LINEAR_WEIGHT.search("model.layers.0.self_attn.q_proj.weight")
    assert LINEAR_WEIGHT.search("model.layers.11.mlp.down_proj.weight")
    for name in ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]:
        assert not LINEAR_WEIGHT.search(name)


def test_unknown_recipe(tmp_path, tiny_teacher):
    with pytest.raises(KeyError, match="unknown quantization recipe"):
        build_quantized(tiny_teacher, tmp_path / "x", "rtn-int3")


@pytest.mark.parametrize("recipe, bits", [("rtn-int8", 8), ("rtn-int4", 4)])
def test_build_rtn(recipe, bits, tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_quantized(tiny_teacher, tmp_path / recipe, recipe)
    marker = read_recipe(out)
    assert marker["recipe"] == recipe and marker["fake_quant"] is True and marker["bits"] == bits
    assert marker["source"] == str(os.path.realpath(tiny_teacher)) and marker["description"] == RECIPES[recipe]
    assert json.loads((out / "config.json").read_text())["cousins_fake_quant"]["bits"] == bits
    assert not list(tmp_path.glob("*.tmp-*"))
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (Path(tiny_teacher) / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out).encode("def f():") == AutoTokenizer.from_pretrained(
        tiny_teacher).encode("def f():")

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).state_dict()
    cousin = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert teacher.keys() == cousin.keys()
    n_linear = 0
    for name, t in teacher.items():
        if LINEAR_WEIGHT.search(name):
            n_linear += 1
            assert not torch.equal(t, cousin[name]), name
            assert torch.equal(cousin[name], rtn_fake_quant(t, bits)), name
            assert max(len(torch.unique(r)) for r in cousin[name]) <= 2 ** bits - 1
        else:
            assert torch.equal(t, cousin[name]), f"{name} must be copied unchanged"
    assert n_linear == 2 * 7

    # idempotent: a complete build of the same recipe is returned as is
    stamp = (out / RECIPE_FILE).stat().st_mtime_ns
    assert build_quantized(tiny_teacher, out, recipe) == out
    assert (out / RECIPE_FILE).stat().st_mtime_ns == stamp


def test_a_rebuilt_original_makes_its_quantized_cousins_stale(tiny_teacher, tmp_path):
    """A cousin remembers the original's build marker; a new build of the original (another
    recipe, other lessons) is built from again, as is another original."""
    import shutil

    from cousins.family.quantize import is_current

    src = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, src)
    out = build_quantized(src, tmp_path / "int8", "rtn-int8")
    assert is_current(out, src, "rtn-int8") and not is_current(out, src, "rtn-int4")
    assert not is_current(out, tiny_teacher, "rtn-int8")  # another original
    marker = json.loads((src / RECIPE_FILE).read_text())
    (src / RECIPE_FILE).write_text(json.dumps({**marker, "train_steps": marker["train_steps"] + 1}))
    assert not is_current(out, src, "rtn-int8")
    stamp = (out / RECIPE_FILE).stat().st_mtime_ns
    build_quantized(src, out, "rtn-int8")
    assert is_current(out, src, "rtn-int8") and (out / RECIPE_FILE).stat().st_mtime_ns != stamp


@pytest.mark.parametrize("recipe, fmt, dtype", [("w8a8-int8", "int-quantized", torch.int8),
                                                ("fp8-dynamic", "float-quantized", torch.float8_e4m3fn)])
def test_build_compressed_tensors(recipe, fmt, dtype, tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    out = build_quantized(tiny_teacher, tmp_path / recipe, recipe)
    assert read_recipe(out)["fake_quant"] is False
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == fmt
    assert qcfg["quantization_status"] == "compressed" and qcfg["ignore"] == ["lm_head"]
    group = qcfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"]
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]

    teacher = load_file(os.path.join(tiny_teacher, "model.safetensors"))
    cousin = load_file(out / "model.safetensors")
    for name, t in teacher.items():
        if LINEAR_WEIGHT.search(name):
            q, scale = cousin[name], cousin[name.replace(".weight", ".weight_scale")]
            assert q.dtype == dtype and scale.shape == (t.shape[0], 1)
            # per-channel min-max: the dequantized weight is close to the original
            rel = 0.5 / 127 if dtype == torch.int8 else 2 ** -4  # half a step / e4m3's relative spacing
            assert ((q.float() * scale - t).abs() <= rel * t.abs().amax(1, keepdim=True) * 1.01 + 1e-9).all()
        else:
            assert torch.equal(t, cousin[name]), f"{name} must be copied unchanged"


# --------------------------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def cousins_dir(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("cousins")
    return lambda recipe: build_quantized(tiny_teacher, root / recipe, recipe)


def _vllm_greedy(path, dtype: str, quantization: str | None = None) -> list:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"})
    from vllm import LLM, SamplingParams

    with hide_context_proxies():  # the suite's S3 server put Flask proxies in this process
        llm = LLM(model=str(path), dtype=dtype, quantization=quantization, max_model_len=256,
                  kv_cache_memory_bytes=256 << 20, enforce_eager=True, distributed_executor_backend="uni",
                  max_logprobs=20, logprobs_mode="raw_logprobs", seed=0)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, logprobs=5))
        return [o.outputs[0] for o in outs]
    finally:
        del llm
        gc.collect()


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("recipe", OWN_RECIPES)
def test_vllm_loads_and_generates(recipe, cousins_dir):
    path = cousins_dir(recipe)
    outs = _vllm_greedy(path, read_recipe(path)["vllm_dtype"])
    assert len(outs) == len(PROMPTS)
    for o in outs:
        assert len(o.token_ids) >= 1 and o.logprobs and len(o.logprobs[0]) >= 5


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_vllm_online_fp8_per_channel(tiny_teacher):
    """vLLM's on-the-fly fp8 per-channel quantization of the fp32 teacher: it refuses float32
    (supported: bfloat16, float16), so a cousin made this way is served in bfloat16."""
    outs = _vllm_greedy(tiny_teacher, "bfloat16", "fp8_per_channel")
    assert all(len(o.token_ids) >= 1 for o in outs)


@pytest.mark.integration
def test_int4_drifts_more_than_int8(tiny_teacher, cousins_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = ["def main(argv):\n    return 0\n", "import os\nimport sys\n\nclass Foo(object):\n    pass\n",
             "for i in range(10):\n    print(i)\n"]

    def logprobs(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return [torch.log_softmax(model(torch.tensor([tok.encode(t)])).logits[0], -1) for t in texts]

    teacher = logprobs(tiny_teacher)

    def mean_kl(path):
        cousin = logprobs(cousins_dir(path))
        kl = [(p.exp() * (p - q)).sum(-1) for p, q in zip(teacher, cousin)]
        return torch.cat(kl).mean().item()

    kl8, kl4 = mean_kl("rtn-int8"), mean_kl("rtn-int4")
    assert 0 < kl8 < kl4, (kl8, kl4)
