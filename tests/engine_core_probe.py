"""One engine actor on the tiny teacher, its core where `argv[2]` says (engine.core_process), one
batch of rows: prints a JSON line of where the core ran and the rows' texts and tokens. Run as a
script by test_engine_vllm (vLLM reads its process switch once per process)."""

from __future__ import annotations

import json
import sys


def main(model_path: str, core_process: str) -> None:
    import pyarrow as pa

    from cousins.engine import actors
    from cousins.engine import rows as engine_rows
    from cousins.engine import backend as engine

    spec = engine.EngineSpec(model_name="tiny-teacher", model_path=model_path, dtype="float32", quantization=None,
                             max_model_len=256, kv_cache_bytes=128 << 20, tensor_parallel_size=1, max_num_seqs=64,
                             enforce_eager=True, max_logprobs=20, core_process=core_process)
    sampling = engine.Sampling(temperature=0.8, top_p=0.95, top_k=0, max_tokens=24, logprobs=5)
    prompts = pa.table({"prompt_id": [f"p{i}" for i in range(16)], "category": [None] * 16,
                        "messages": [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]
                                     for i in range(16)]})
    actor = actors.EngineActor(spec, sampling)
    out = actor(engine_rows.expand_samples(prompts, samples=1, base_seed=7))
    print(json.dumps({"core_client": type(actor.llm.llm_engine.engine_core).__name__,
                      "texts": out.column("output_text").to_pylist(),
                      "logprobs": out.column("output_logprobs").to_pylist(),
                      "errors": out.column("error").to_pylist()}))


if __name__ == "__main__":  # (vLLM spawns its engine core process: the guard keeps it from rerunning this)
    main(sys.argv[1], sys.argv[2])
