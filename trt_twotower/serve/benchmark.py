"""``bench --serve``: the Triton path against the in-process session on the same machine and
model, for several numbers of concurrent clients.

Both paths get the same prompts (text the server tokenizes exactly as the session's tokenizer
does) and the same settings, so they produce the same tokens; what differs is the cost of the
serving layer: gRPC, the ensemble's pre/post-processing, the orchestrator's BLS calls and the
towers' per-sequence (batch-1) steps. The in-process session batches concurrent requests, the
Triton towers serve one sequence per call, so the ratio falls with the client count — the
table says by how much. Bytes crossing process boundaries are counted where they cross: the
orchestrator's BLS link adds up the tensors it sends to and receives from the towers, and the
client the tensor payloads of its requests and responses (gRPC framing not included)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..policy import GenerationSettings
from ..runtime.executor import OpenBackend
from ..runtime.benchmark import format_table
from ..runtime.session import Request, TwoTowerSession


@dataclass
class ServeRow:
    path: str
    clients: int
    tokens: int
    seconds: float
    first_block_seconds: float
    tower_bytes: Optional[int] = None
    client_bytes: Optional[int] = None
    ratio_tokens_per_second: Optional[float] = None
    ratio_first_block: Optional[float] = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def per_token(self, value: Optional[int]) -> Optional[float]:
        return value / self.tokens if value is not None and self.tokens else None


def in_process(backend: OpenBackend, prompts: list[list[int]],
               settings: GenerationSettings) -> ServeRow:
    """All clients' requests batched by one session (after one warm-up run)."""
    session = TwoTowerSession(backend.context, backend.denoiser, backend.config,
                              backend.max_context, backend.dtype, backend.fused_unmask)
    session.generate([Request(p, settings) for p in prompts])
    firsts: dict[int, float] = {}
    start = time.perf_counter()

    def first_seen(row: int) -> Callable[[list[int]], None]:
        def note(ids: list[int]) -> None:
            firsts.setdefault(row, time.perf_counter() - start)
        return note

    results = session.generate([Request(p, settings, first_seen(i))
                                for i, p in enumerate(prompts)])
    seconds = time.perf_counter() - start
    return ServeRow("in-process", len(prompts), sum(len(r.tokens) for r in results), seconds,
                    sum(firsts.values()) / max(len(firsts), 1))


@dataclass
class _ClientRun:
    tokens: int = 0
    first_block: Optional[float] = None
    tower_bytes: int = 0
    client_bytes: int = 0
    error: Optional[BaseException] = None


def _one_client(url: str, prompt: str, settings: GenerationSettings, go: threading.Barrier,
                clock: list[float], out: _ClientRun, timeout: float) -> None:
    from .client import request_bytes, stream_generate
    try:
        out.client_bytes = request_bytes(prompt, settings)
        for ids, text, stats in stream_generate(url, prompt, settings, True, timeout,
                                                before_send=go.wait):
            if ids and out.first_block is None:
                out.first_block = time.perf_counter() - clock[0]
            out.tokens += len(ids)
            out.client_bytes += 8 * len(ids) + len(text.encode())
            if stats:
                out.tower_bytes = stats.get("boundary_bytes") or 0
                out.client_bytes += len(json.dumps(stats))
    except BaseException as err:  # reported by the caller, with the client it belongs to
        out.error = err
        go.abort()


def through_triton(url: str, prompts: list[str], settings: GenerationSettings,
                   timeout: float = 600.0) -> ServeRow:
    """One streaming gRPC client per prompt; the clock starts once every stream is open."""
    runs = [_ClientRun() for _ in prompts]
    go, clock = threading.Barrier(len(prompts) + 1), [0.0]
    threads = [threading.Thread(target=_one_client,
                                args=(url, p, settings, go, clock, r, timeout))
               for p, r in zip(prompts, runs)]
    for t in threads:
        t.start()
    try:
        clock[0] = time.perf_counter()
        go.wait()
        clock[0] = time.perf_counter()
    except threading.BrokenBarrierError:
        pass  # a client failed to open its stream; its error is reported below
    for t in threads:
        t.join()
    seconds = time.perf_counter() - clock[0]
    failed = [r.error for r in runs if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} clients failed: {failed[0]}")
    firsts = [r.first_block for r in runs if r.first_block is not None]
    return ServeRow("triton", len(prompts), sum(r.tokens for r in runs), seconds,
                    sum(firsts) / max(len(firsts), 1),
                    tower_bytes=sum(r.tower_bytes for r in runs),
                    client_bytes=sum(r.client_bytes for r in runs))


def _median(runs: list[ServeRow]) -> ServeRow:
    """The run of median tokens/s: short runs on a shared machine are noisy both ways."""
    return sorted(runs, key=lambda r: r.tokens_per_second)[len(runs) // 2]


def compare(backend: OpenBackend, url: str, prompt_ids: list[list[int]], decode: Any,
            encode: Any, client_counts: list[int], settings: GenerationSettings,
            repeats: int = 5, progress: bool = True) -> list[ServeRow]:
    """For each client count: the in-process row, then the Triton row with its ratios; each
    the median of ``repeats`` runs, alternating the paths so drift hits both alike.

    Prompts are decoded to text and re-encoded, so both paths start from the ids the server's
    tokenizer produces."""
    from tqdm import tqdm

    texts = [decode(ids) for ids in prompt_ids]
    ids = [encode(t) for t in texts]
    through_triton(url, texts[:1], settings)  # warm the server's models
    rows: list[ServeRow] = []
    for n in tqdm(client_counts, desc="bench --serve", disable=not progress):
        local_runs, served_runs = [], []
        for _ in range(repeats):
            local_runs.append(in_process(backend, [ids[i % len(ids)] for i in range(n)],
                                         settings))
            served_runs.append(through_triton(url, [texts[i % len(texts)] for i in range(n)],
                                              settings))
        local, served = _median(local_runs), _median(served_runs)
        served.ratio_tokens_per_second = served.tokens_per_second / local.tokens_per_second
        served.ratio_first_block = local.first_block_seconds / served.first_block_seconds
        rows += [local, served]
    return rows


COLUMNS = ("path", "clients", "tokens", "tokens/s ratio", "first-block ratio",
           "tower bytes/token", "client bytes/token")


def format_rows(rows: list[ServeRow], markdown: bool = False) -> str:
    """Ratios are Triton over in-process (1.0 = no serving cost); absolute times stay out of
    the table because they belong to this machine."""
    return format_table(COLUMNS, [[r.path, r.clients, r.tokens, r.ratio_tokens_per_second,
                                   r.ratio_first_block, r.per_token(r.tower_bytes),
                                   r.per_token(r.client_bytes)] for r in rows], markdown)
