"""The Triton server as a load-benchmark target (``runtime.load_benchmark.Target``): each
request is one streaming gRPC client sending token ids straight to the orchestrator
(``twotower_bls``), so that both paths start from the same ids and the table measures the
serving layer — gRPC, the orchestrator and the tower calls — not tokenization."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from ..policy import GenerationSettings
from .client import stream_generate


class TritonTarget:
    name = "triton"

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url, self.timeout = url, timeout
        self.boundary_bytes = 0   # what the tower calls of finished requests moved
        self._lock = threading.Lock()

    def start(self, prompt: list[int], settings: GenerationSettings,
              on_delta: Callable[[list[int]], None]) -> Callable[[], object]:
        failure: list[Optional[BaseException]] = [None]

        def run() -> None:
            try:
                for ids, _, stats in stream_generate(self.url, list(prompt), settings, True,
                                                     self.timeout):
                    if len(ids):
                        on_delta(list(ids))
                    if stats:
                        with self._lock:
                            self.boundary_bytes += stats.get("boundary_bytes") or 0
            except BaseException as err:  # re-raised by the waiter, in the caller's thread
                failure[0] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            if failure[0] is not None:
                raise failure[0]
        return wait
