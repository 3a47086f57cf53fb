"""Load on the in-process engine: closed-loop clients and Poisson arrivals, as a server sees them.

Closed loop: C clients each send a request, wait for its last block, and send the next, until
the run's request count is reached. Poisson: requests arrive at exponential intervals of mean
1/rate, whatever the engine's state (an open loop, so queueing shows in the latencies). Each
request streams; its time to first block and the gaps between its blocks are recorded, and the
table reports output tokens/s, requests/s and the p50/p99 of both latencies. Every mode runs on
the same engine, one after another.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..policy import GenerationSettings
from .scheduler import Request
from .session import TwoTowerSession


@dataclass
class Timeline:
    """One request's clock: when it was sent, when each delta landed, its tokens."""

    sent: float
    deltas: list[float] = field(default_factory=list)
    tokens: int = 0

    def on_delta(self, ids: list[int]) -> None:
        self.deltas.append(time.perf_counter())
        self.tokens += len(ids)

    @property
    def first_block(self) -> Optional[float]:
        return self.deltas[0] - self.sent if self.deltas else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.deltas, self.deltas[1:])]


@dataclass
class LoadRow:
    label: str
    load: str
    requests: int
    tokens: int
    seconds: float
    first_block: list[float]
    gaps: list[float]

    def record(self) -> dict:
        return {"case": self.label, "load": self.load, "requests": self.requests,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 3),
                "first_block_p50_ms": _ms(percentile(self.first_block, 50)),
                "first_block_p99_ms": _ms(percentile(self.first_block, 99)),
                "gap_p50_ms": _ms(percentile(self.gaps, 50)),
                "gap_p99_ms": _ms(percentile(self.gaps, 99))}


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile, interpolating linearly between order statistics."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


def _row(label: str, load: str, timelines: list[Timeline], seconds: float) -> LoadRow:
    return LoadRow(label, load, len(timelines), sum(t.tokens for t in timelines), seconds,
                   [t.first_block for t in timelines if t.first_block is not None],
                   [g for t in timelines for g in t.gaps])


def closed_loop(session: TwoTowerSession, prompts: list[list[int]],
                settings: GenerationSettings, clients: int, total: int, label: str
                ) -> LoadRow:
    """``clients`` threads, each sending its next request when the last one ends."""
    timelines: list[Timeline] = []
    lock, sent = threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                if sent[0] >= total:
                    return
                index = sent[0]
                sent[0] += 1
            timeline = Timeline(time.perf_counter())
            request = Request(prompts[index % len(prompts)], settings, timeline.on_delta)
            session.submit(request).result()
            with lock:
                timelines.append(timeline)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _row(label, f"{clients} clients", timelines, time.perf_counter() - start)


def poisson(session: TwoTowerSession, prompts: list[list[int]], settings: GenerationSettings,
            rate: float, total: int, label: str, seed: int = 0) -> LoadRow:
    """``total`` requests arriving at ``rate`` per second on average (exponential gaps)."""
    draw = random.Random(seed)
    timelines, handles = [], []
    start = time.perf_counter()
    due = start
    for index in range(total):
        due += draw.expovariate(rate)
        time.sleep(max(0.0, due - time.perf_counter()))
        timeline = Timeline(time.perf_counter())
        timelines.append(timeline)
        handles.append(session.submit(Request(prompts[index % len(prompts)], settings,
                                              timeline.on_delta)))
    for handle in handles:
        handle.result()
    return _row(label, f"Poisson {rate:g}/s", timelines, time.perf_counter() - start)


def run_load(session_factory: Callable[[], TwoTowerSession], prompts: list[list[int]],
             cases: list[tuple[str, GenerationSettings]], clients: list[int],
             rates: list[float], requests_per_client: int, poisson_requests: int,
             progress: Callable[[LoadRow], None] = lambda row: None) -> list[LoadRow]:
    """Every case under every load, each on a warmed engine of its own."""
    rows = []
    for label, settings in cases:
        for count in clients:
            with session_factory() as session:
                session.generate([Request(prompts[0], settings)])
                rows.append(closed_loop(session, prompts, settings, count,
                                        count * requests_per_client, label))
            progress(rows[-1])
        for rate in rates:
            with session_factory() as session:
                session.generate([Request(prompts[0], settings)])
                rows.append(poisson(session, prompts, settings, rate, poisson_requests,
                                    label))
            progress(rows[-1])
    return rows


def format_load(rows: list[LoadRow]) -> str:
    header = ("| case | load | requests | output tok/s | req/s | first block p50 / p99 (ms) "
              "| gap p50 / p99 (ms) |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        r = {k: "–" if v is None else v for k, v in row.record().items()}
        lines.append(f"| {r['case']} | {r['load']} | {r['requests']} | {r['tokens_per_s']} | "
                     f"{r['requests_per_s']} | {r['first_block_p50_ms']} / "
                     f"{r['first_block_p99_ms']} | {r['gap_p50_ms']} / {r['gap_p99_ms']} |")
    return "\n".join(lines)
