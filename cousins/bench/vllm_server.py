"""vLLM's own OpenAI-compatible server (the CPU build's `vllm.entrypoints.openai.api_server`
module) on 127.0.0.1, as a user deploys one: started in its own process group, waited for with a
bound, stopped by its id. Settings as our engines run the tiny models on CPU (float32, raw
logprobs, unchunked prefill: a seeded request must not be split over steps there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (for a server a test or benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    def __init__(self, model: str, name: str, log: Path, *, max_model_len: int = 256, dtype: str = "float32"):
        self.port, self.name, self.log = free_port(), name, log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--max-logprobs", "20", "--logprobs-mode", "raw_logprobs",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096", "--seed", "0"]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait(self, timeout_s: float = 300) -> "VllmServer":
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM's server did not answer within {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
