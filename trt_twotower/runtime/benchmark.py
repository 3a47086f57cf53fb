"""Throughput benchmarks of the session: AR vs diffusion on the same backend and device.

Everything is measured in one process and reported as ratios where the machine matters:
diffusion tokens/s over AR tokens/s, session wall time over the time spent inside executor
calls. ``forced_commits`` commits exactly K tokens per denoiser step, which measures the cost
curve independently of how confident the weights are.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..policy import GenerationSettings
from .executor import OpenBackend
from .session import Request, TwoTowerSession


@dataclass
class BenchRow:
    mode: str
    batch: int
    threshold: Optional[float]
    block_size: int
    steps_per_block: int
    forced_commits: Optional[int]
    tokens: int
    seconds: float
    denoiser_evals: int
    executor_seconds: float
    experts_per_step: Optional[float] = None
    speedup_vs_ar: Optional[float] = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def tokens_per_eval(self) -> Optional[float]:
        return self.tokens / self.denoiser_evals if self.denoiser_evals else None

    @property
    def session_overhead(self) -> float:
        """Session wall time over time inside executor calls (1.0 = no overhead)."""
        return self.seconds / self.executor_seconds if self.executor_seconds else float("nan")

    def record(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(tokens_per_second=round(self.tokens_per_second, 3),
                   tokens_per_eval=self.tokens_per_eval,
                   session_overhead=round(self.session_overhead, 4))
        return row


class TimedExecutor:
    """Wraps an executor and adds up the wall time of its step calls."""

    def __init__(self, inner: Any, clock: "ExecutorClock") -> None:
        self._inner, self._clock = inner, clock
        self.device = inner.device

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or not name.endswith("_step"):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._clock.seconds += time.perf_counter() - start
        return timed


@dataclass
class ExecutorClock:
    seconds: float = 0.0


@dataclass
class ExpertCounter:
    """Distinct routed experts per MoE layer call of the denoiser (PyTorch backend only)."""

    counts: list[int] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def attach(self, model: Any) -> "ExpertCounter":
        from ..reference.moe import Router
        for module in model.denoiser_tower.modules():
            if isinstance(module, Router):
                self.handles.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.counts.append(int(torch.unique(output[0]).numel()))

    def mean(self) -> Optional[float]:
        return sum(self.counts) / len(self.counts) if self.counts else None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


def run_case(backend: OpenBackend, prompts: list[list[int]], settings: GenerationSettings,
             model: Any = None) -> BenchRow:
    """One timed batch (after one warm-up run of the same batch)."""
    clock = ExecutorClock()
    session = TwoTowerSession(TimedExecutor(backend.context, clock),
                              TimedExecutor(backend.denoiser, clock), backend.config,
                              backend.max_context, backend.dtype, backend.fused_unmask)
    requests = [Request(p, settings) for p in prompts]
    session.generate(requests)
    clock.seconds = 0.0
    counter = ExpertCounter().attach(model) if model is not None else None
    start = time.perf_counter()
    results = session.generate(requests)
    seconds = time.perf_counter() - start
    if counter is not None:
        counter.detach()
    return BenchRow(
        mode=settings.mode, batch=len(prompts),
        threshold=settings.confidence_threshold if settings.mode == "diffusion" else None,
        block_size=settings.block_size, steps_per_block=settings.steps_per_block,
        forced_commits=settings.forced_commits, tokens=sum(len(r.tokens) for r in results),
        seconds=seconds, denoiser_evals=sum(r.stats.denoiser_evals for r in results),
        executor_seconds=clock.seconds,
        experts_per_step=counter.mean() if counter is not None else None)


def sweep(backend: OpenBackend, prompts_for: Callable[[int], list[list[int]]],
          batches: Iterable[int], thresholds: Iterable[float], block_sizes: Iterable[int],
          steps: Iterable[int], max_new_tokens: int, forced: Iterable[int] = (),
          model: Any = None, progress: bool = True) -> list[BenchRow]:
    """AR once per batch size, then every diffusion setting against it."""
    from tqdm import tqdm

    cases: list[tuple[int, GenerationSettings]] = []
    for b in batches:
        cases.append((b, GenerationSettings(mode="ar", max_new_tokens=max_new_tokens,
                                            stop_at_eos=False)))
        for size in block_sizes:
            for t in steps:
                for gamma in thresholds:
                    cases.append((b, GenerationSettings(
                        max_new_tokens=max_new_tokens, block_size=size, steps_per_block=t,
                        confidence_threshold=gamma, stop_at_eos=False)))
                for k in forced:
                    cases.append((b, GenerationSettings(
                        max_new_tokens=max_new_tokens, block_size=size, steps_per_block=t,
                        forced_commits=k, stop_at_eos=False)))
    rows: list[BenchRow] = []
    ar_rate: dict[int, float] = {}
    for b, settings in tqdm(cases, desc="bench", disable=not progress):
        row = run_case(backend, prompts_for(b), settings, model)
        if settings.mode == "ar":
            ar_rate[b] = row.tokens_per_second
        else:
            row.speedup_vs_ar = row.tokens_per_second / ar_rate[b]
        rows.append(row)
    return rows


COLUMNS = ("mode", "batch", "threshold", "block_size", "steps_per_block", "forced_commits",
           "tokens", "tokens_per_eval", "experts_per_step", "speedup_vs_ar", "session_overhead")


def format_table(columns: tuple[str, ...], table: list[list[Any]], markdown: bool = False
                 ) -> str:
    """Aligned text (or a markdown table): None prints as -, floats with 3 decimals."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    if markdown:
        return "\n".join(["| " + " | ".join(columns) + " |",
                          "|---" + "|---:" * (len(columns) - 1) + "|"] +
                         ["| " + " | ".join(map(cell, values)) + " |" for values in table])
    widths = [max(len(c), *(len(cell(v[i])) for v in table)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(cell(v).rjust(w) for v, w in zip(values, widths)) for values in table]
    return "\n".join(lines)


def format_rows(rows: list[BenchRow]) -> str:
    records = [r.record() for r in rows]
    return format_table(COLUMNS, [[rec[c] for c in COLUMNS] for rec in records])


def write_csv(rows: list[BenchRow], path: Path) -> Path:
    records = [r.record() for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def plot(rows: list[BenchRow], path: Path) -> Path:
    """Diffusion speed-up over AR against γ (one line per batch size) and against batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffusion = [r for r in rows if r.mode == "diffusion" and r.forced_commits is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for b in sorted({r.batch for r in diffusion}):
        pts = sorted((r.threshold, r.speedup_vs_ar) for r in diffusion if r.batch == b)
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="confidence threshold γ", ylabel="tokens/s ÷ AR tokens/s",
             title="diffusion vs AR")
    left.legend()
    for gamma in sorted({r.threshold for r in diffusion}):
        pts = sorted((r.batch, r.speedup_vs_ar) for r in diffusion if r.threshold == gamma)
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"γ={gamma}")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="batch size", ylabel="tokens/s ÷ AR tokens/s", xscale="log", title="vs batch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
