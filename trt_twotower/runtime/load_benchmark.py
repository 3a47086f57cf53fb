"""Load on an engine: closed-loop clients and Poisson arrivals, as a server sees them.

Closed loop: C clients each send a request, wait for its last block, and send the next, until
the run's request count is reached. Poisson: requests arrive at exponential intervals of mean
1/rate, whatever the engine's state (an open loop, so queueing shows in the latencies). Each
request streams; its time to first block and the gaps between its blocks are recorded, and the
table reports output tokens/s, requests/s and the p50/p99 of both latencies.

The engine is a ``Target``: the in-process session here, or a Triton server through its gRPC
streaming clients (``trt_twotower.serve.load_target``). Given both, every case and load runs
on one and then the other, so that drift hits both alike, and the served rows carry their
tokens/s ratio to the in-process row of the same case and load.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Protocol

from ..policy import GenerationSettings
from .heap import freeze_long_lived
from .rows import Request
from .session import TwoTowerSession

OnIds = Callable[[list[int]], None]


class Target(Protocol):
    """What the load runs on: ``start`` sends one streaming request and returns a function
    that waits for its end (raising what failed it)."""

    name: str

    def start(self, prompt: list[int], settings: GenerationSettings,
              on_delta: OnIds) -> Callable[[], object]: ...

    def connect(self, senders: int) -> None:
        """Open, before the clock starts, what ``senders`` new sending threads will use: a
        serving client connects once and keeps its connection, so a run measures serving,
        not the benchmark's own connection set-up."""


class SessionTarget:
    """The in-process engine."""

    name = "in-process"

    def __init__(self, session: TwoTowerSession) -> None:
        self.session = session

    def start(self, prompt: list[int], settings: GenerationSettings,
              on_delta: OnIds) -> Callable[[], object]:
        return self.session.submit(Request(prompt, settings, on_delta)).result

    def connect(self, senders: int) -> None:
        """Nothing to open in process."""


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
    path: str = "in-process"
    ratio: Optional[float] = None     # tokens/s over the in-process row of the same load
    boundary_bytes: Optional[int] = None   # what crossed process boundaries (served rows)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def record(self) -> dict:
        return {"path": self.path, "case": self.label, "load": self.load,
                "requests": self.requests,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 3),
                "first_block_p50_ms": _ms(percentile(self.first_block, 50)),
                "first_block_p99_ms": _ms(percentile(self.first_block, 99)),
                "gap_p50_ms": _ms(percentile(self.gaps, 50)),
                "gap_p99_ms": _ms(percentile(self.gaps, 99)),
                "ratio": None if self.ratio is None else round(self.ratio, 3),
                "bytes_per_token": None if self.boundary_bytes is None or not self.tokens
                else round(self.boundary_bytes / self.tokens)}


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


def _row(target: Target, label: str, load: str, timelines: list[Timeline], seconds: float
         ) -> LoadRow:
    return LoadRow(label, load, len(timelines), sum(t.tokens for t in timelines), seconds,
                   [t.first_block for t in timelines if t.first_block is not None],
                   [g for t in timelines for g in t.gaps], target.name)


def closed_loop(target: Target, prompts: list[list[int]],
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
            target.start(prompts[index % len(prompts)], settings, timeline.on_delta)()
            with lock:
                timelines.append(timeline)

    target.connect(clients)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _row(target, label, f"{clients} clients", timelines, time.perf_counter() - start)


def poisson(target: Target, prompts: list[list[int]], settings: GenerationSettings,
            rate: float, total: int, label: str, seed: int = 0) -> LoadRow:
    """``total`` requests arriving at ``rate`` per second on average (exponential gaps)."""
    draw = random.Random(seed)
    timelines, waits = [], []
    target.connect(1)
    start = time.perf_counter()
    due = start
    for index in range(total):
        due += draw.expovariate(rate)
        time.sleep(max(0.0, due - time.perf_counter()))
        timeline = Timeline(time.perf_counter())
        timelines.append(timeline)
        waits.append(target.start(prompts[index % len(prompts)], settings, timeline.on_delta))
    for wait in waits:
        wait()
    return _row(target, label, f"Poisson {rate:g}/s", timelines, time.perf_counter() - start)


TargetFactory = Callable[[], ContextManager[Target]]


def run_load(targets: list[TargetFactory], prompts: list[list[int]],
             cases: list[tuple[str, GenerationSettings]], clients: list[int],
             rates: list[float], requests_per_client: int, poisson_requests: int,
             progress: Callable[[LoadRow], None] = lambda row: None,
             repeats: int = 1) -> list[LoadRow]:
    """Every case under every load on every target in turn, each run after a warm-up
    request; a served row gets its ratio to the first target's row of the same load. With
    ``repeats`` > 1 the targets take turns that many times and each path keeps its median run
    (by tokens/s), so that a drift of the machine during one run weighs less. What is set up
    before the first run (the model, the imports) is frozen out of full collections
    (``heap.py``): one of them (185–290 ms here) must not land in one path's run and not the
    other's. Not per run: a target's engine lives for one run, and frozen it would never be
    freed."""
    freeze_long_lived()
    rows = []
    loads = [(closed_loop, count, count * requests_per_client) for count in clients] + \
            [(poisson, rate, poisson_requests) for rate in rates]
    for label, settings in cases:
        for run, amount, total in loads:
            runs: list[list[LoadRow]] = [[] for _ in targets]
            for _ in range(repeats):
                for index, open_target in enumerate(targets):
                    with open_target() as target:
                        target.start(prompts[0], settings, lambda ids: None)()
                        counted = hasattr(target, "boundary_bytes")
                        if counted:
                            target.boundary_bytes = 0
                        row = run(target, prompts, settings, amount, total, label)
                        if counted:
                            row.boundary_bytes = target.boundary_bytes
                    runs[index].append(row)
                    progress(row)
            kept = [median_run(path_runs) for path_runs in runs]
            for row in kept[1:]:
                row.ratio = row.tokens_per_second / kept[0].tokens_per_second
            rows.extend(kept)
    return rows


def median_run(runs: list[LoadRow]) -> LoadRow:
    """The run with the median tokens/s (the lower middle of an even count)."""
    return sorted(runs, key=lambda row: row.tokens_per_second)[(len(runs) - 1) // 2]


def format_load(rows: list[LoadRow]) -> str:
    """A markdown table; the path and ratio columns appear when more than one target ran."""
    paths = len({row.path for row in rows}) > 1
    header = ("| case | load | requests | output tok/s | req/s | first block p50 / p99 (ms) "
              "| gap p50 / p99 (ms) |")
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if paths:
        header = "| path " + header + " tok/s ratio | tower bytes/token |"
        rule = "|---" + rule + "---:|---:|"
    lines = [header, rule]
    for row in rows:
        r = {k: "–" if v is None else v for k, v in row.record().items()}
        line = (f"| {r['case']} | {r['load']} | {r['requests']} | {r['tokens_per_s']} | "
                f"{r['requests_per_s']} | {r['first_block_p50_ms']} / "
                f"{r['first_block_p99_ms']} | {r['gap_p50_ms']} / {r['gap_p99_ms']} |")
        lines.append(f"| {r['path']} " + line + f" {r['ratio']} | {r['bytes_per_token']} |"
                     if paths else line)
    return "\n".join(lines)


def plot_load(rows: list[LoadRow], path: Path) -> Path:
    """Output tokens/s against closed-loop clients, one line per case and path, and the
    first-block p50 beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in rows if r.load.endswith(" clients")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r.label, r.path) for r in closed}):
        pts = sorted((int(r.load.split()[0]), r) for r in closed if (r.label, r.path) == key)
        style = "-" if key[1] == "in-process" else "--"
        name = f"{key[0]} ({key[1]})"
        left.plot([c for c, _ in pts], [r.tokens_per_second for _, r in pts], style,
                  marker="o", label=name)
        right.plot([c for c, _ in pts], [1000 * percentile(r.first_block, 50) for _, r in pts],
                   style, marker="o", label=name)
    left.set(xlabel="concurrent clients", ylabel="output tokens/s", xscale="log",
             title="throughput")
    right.set(xlabel="concurrent clients", ylabel="first block p50 (ms)", xscale="log",
              yscale="log", title="time to first block")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
