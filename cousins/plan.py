"""From the config to the narrow values the stages take: which models run, how each engine starts,
how rows are sampled, where the engines go. The one place that reads `Config` for the stages."""

from __future__ import annotations

from cousins.config import MAX_LOGPROBS, Config
from cousins.engine import GPU_MEMORY_UTILIZATION, EngineSpec, Placement, Sampling
from cousins.records import NOISE_FLOOR, ModelEntry, SamplingRecord


def model_entries(cfg: Config, *, noise_floor: bool = False) -> list[ModelEntry]:
    """The original first, then the cousins in config order, then (if asked) the noise floor."""
    m = cfg.model
    out = [ModelEntry(m.name, m.path, m.dtype, m.quantization, "original")]
    for name, c in cfg.cousins.items():
        out.append(ModelEntry(name, c.path or m.path, c.dtype or m.dtype, c.quantization, c.kind, c.text_only))
    if noise_floor:
        out.append(ModelEntry(NOISE_FLOOR, m.path, m.dtype, m.quantization, "noise", reorder=True))
    return out


def reordered_batch_size(batch_size: int) -> int:
    """The noise floor's batch size: another batch composition than the original pass's."""
    return max(1, (batch_size * 3) // 4 + 1) if batch_size > 1 else 2


def engine_spec(cfg: Config, entry: ModelEntry) -> EngineSpec:
    """How `entry`'s engine starts. Every engine allows MAX_LOGPROBS, whatever this run stores."""
    e = cfg.engine
    return EngineSpec(
        model_name=entry.name, model_path=entry.path, dtype=entry.dtype, quantization=entry.quantization,
        max_model_len=e.max_model_len, kv_cache_bytes=int(e.kv_cache_gib * (1 << 30)),
        tensor_parallel_size=e.tensor_parallel_size, max_num_seqs=e.max_num_seqs,
        enforce_eager=e.enforce_eager, max_logprobs=MAX_LOGPROBS, pipeline_parallel_size=e.pipeline_parallel_size,
        core_process=e.core_process,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION * min(1.0, e.gpus_per_actor) if e.gpus_per_actor > 0 else None,
    )


def placement(cfg: Config, *, reorder: bool = False) -> Placement:
    e = cfg.engine
    return Placement(num_actors=e.num_actors, cpus_per_actor=e.cpus_per_actor, gpus_per_actor=e.gpus_per_actor,
                     batch_size=reordered_batch_size(e.batch_size) if reorder else e.batch_size,
                     start_timeout_s=e.start_timeout_s, tensor_parallel_size=e.tensor_parallel_size,
                     pipeline_parallel_size=e.pipeline_parallel_size)


def sampling(cfg: Config) -> Sampling:
    s = cfg.run.sampling
    return Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    max_tokens=s.max_tokens, logprobs=s.logprobs, stop=tuple(s.stop))


def sampling_record(cfg: Config) -> SamplingRecord:
    s = sampling(cfg)
    return SamplingRecord(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          logprobs=s.logprobs, stop=list(s.stop))
