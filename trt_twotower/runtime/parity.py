"""Parity of a backend with the PyTorch reference: every step type and whole generations.

All backends start from the same inputs and each carries its own cache, so an error in a state
update shows up in the later steps' logits. An fp32 candidate is held to the fp32 reference by
max |a − b| / max |b| over a step's logits and to identical greedy tokens. A bf16/fp16
candidate is held to the reference's own drift (``precision_parity``): it runs beside the
reference in its dtype and the fp32 reference, and generations are reported, not gated
(docs/parity-criterion.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationSettings
from .cache import StepCache
from .executor import ContextExecutor, DenoiserExecutor
from .precision_parity import (DriftCriterion, Divergence, divergence, pooled_top1,
                              unmask_mismatches)
from .session import Request, RequestResult, TwoTowerSession

DEFAULT_TOLERANCE = 1e-4  # fp32 graphs vs fp32 reference, relative
REDUCED_BATCH = 4  # rows per step for bf16/fp16: enough positions for a median per step
UNMASK_THRESHOLD, UNMASK_STEPS_LEFT = 0.5, 3


@dataclass
class StepParity:
    step: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance


@dataclass
class DriftParity:
    """One step of a reduced-precision candidate: its divergence from both references and the
    references' own drift, which sets the bounds."""

    step: str
    drift: Divergence          # reference in the candidate's dtype vs fp32 reference
    vs_reference: Divergence   # candidate vs reference in its dtype
    vs_fp32: Divergence        # candidate vs fp32 reference
    criterion: DriftCriterion

    def ratios(self) -> dict[str, float]:
        """Each statistic over its bound, against both references (above 1 fails)."""
        return {f"{name} vs {against}": value
                for against, d in (("dtype", self.vs_reference), ("fp32", self.vs_fp32))
                for name, value in self.criterion.ratios(self.drift, d).items()}

    @property
    def worst(self) -> float:
        return max(self.ratios().values())

    @property
    def passed(self) -> bool:
        return self.worst <= 1.0


@dataclass
class ReducedParity:
    """Every step of a reduced-precision candidate, its fused unmask and its pooled top-1."""

    steps: list[DriftParity]
    unmask: Optional[StepParity]
    criterion: DriftCriterion

    @property
    def reference_top1(self) -> float:
        return pooled_top1([s.drift for s in self.steps])

    @property
    def candidate_top1(self) -> float:
        return pooled_top1([s.vs_fp32 for s in self.steps])

    @property
    def top1_passed(self) -> bool:
        return self.candidate_top1 >= self.criterion.top1_bound(self.reference_top1)

    def failures(self) -> list[str]:
        failed = [s.step for s in self.steps if not s.passed]
        if self.unmask is not None and not self.unmask.passed:
            failed.append(self.unmask.step)
        return failed + ([] if self.top1_passed else ["top-1 agreement"])


@dataclass
class GenerationParity:
    mode: str
    tokens_equal: bool
    agreement: float
    reference_evals: int
    candidate_evals: int

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.reference_evals == self.candidate_evals


@dataclass
class GenerationDrift:
    """Greedy generations of a reduced-precision candidate, reported: one flipped near tie
    changes every later token, so agreement measures luck as much as correctness."""

    mode: str
    agreement: float            # candidate vs reference in its dtype
    agreement_fp32: float       # candidate vs fp32 reference
    reference_agreement: float  # reference in the candidate's dtype vs fp32 reference


@dataclass
class Backend:
    context: ContextExecutor
    denoiser: DenoiserExecutor
    dtype: torch.dtype = torch.float32


@dataclass
class StepLogits:
    """One step's inputs run by every backend: their logits, in backend order, on the host
    (executors answer on their own devices, and backends on two devices are compared)."""

    step: str
    logits: list[torch.Tensor]

    def __post_init__(self) -> None:
        self.logits = [t.cpu() for t in self.logits]


@dataclass
class UnmaskRun:
    """The fused unmask step's inputs, every backend's denoiser logits for them and the last
    backend's (the candidate's) fused next block."""

    step: str
    block: torch.Tensor
    logits: list[torch.Tensor]
    fused: torch.Tensor


def _errors(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = float((candidate.float() - reference.float()).abs().max())
    return diff, diff / max(float(reference.float().abs().max()), 1e-30)


def policy_next_block(block: torch.Tensor, logits: torch.Tensor, mask_token_id: int
                      ) -> torch.Tensor:
    """What the greedy policy commits from ``logits`` in the fused unmask step's setting."""
    pred, conf = policy.diffusion_predictions(logits.cpu(), mask_token_id)
    nxt, _ = policy.commit_step(block, pred, conf, mask_token_id, UNMASK_THRESHOLD,
                                UNMASK_STEPS_LEFT)
    return nxt


def run_steps(backends: list[Backend], config: TwoTowerConfig, max_context: int,
              block_size: int = 16, prefill_lengths: tuple[int, ...] = (1, 7, 13), seed: int = 0,
              batch: int = 2) -> tuple[list[StepLogits], Optional[UnmaskRun]]:
    """Prefill of several lengths, a decode step (T = 1), a block commit (T = S), denoiser
    steps at several timesteps and prefix lengths (0 included), mock-AR and, when the last
    backend has it, the fused unmask: every backend on the same random, fixed-seed inputs."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[StepLogits] = []

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(4, config.vocab_size, shape, generator=gen)

    def block_with_masks(batch: int) -> torch.Tensor:
        block = ids(batch, block_size)
        block[torch.rand(block.shape, generator=gen) < 0.6] = config.mask_token_id
        return block

    def fresh_caches() -> list[StepCache]:
        return [StepCache.allocate(config, batch, max_context, b.dtype, b.context.device)
                for b in backends]

    def denoise(block: torch.Tensor, tt: torch.Tensor) -> list[torch.Tensor]:
        return [b.denoiser.denoiser_step(block, tt, c.to(b.denoiser.device))
                for b, c in zip(backends, caches)]

    caches = fresh_caches()
    block = block_with_masks(batch)
    for t in (1.0, 0.5):
        rows.append(StepLogits(f"denoiser (prefix 0, t={t})",
                               denoise(block, torch.full((batch,), t))))
    for length in prefill_lengths:
        prompt = ids(batch, length)
        caches = fresh_caches()
        rows.append(StepLogits(f"prefill T={length}", [b.context.context_step(prompt, c)
                                                       for b, c in zip(backends, caches)]))
    snapshots = [c.snapshot_mamba() for c in caches]
    token = ids(batch, 1)
    rows.append(StepLogits("decode T=1", [b.context.context_step(token, c)
                                          for b, c in zip(backends, caches)]))
    rows.append(StepLogits("mock-AR step", [
        b.denoiser.mock_ar_step(token, c.one_token_back(s).to(b.denoiser.device))
        for b, c, s in zip(backends, caches, snapshots)]))
    committed = ids(batch, block_size)
    rows.append(StepLogits(f"commit T={block_size}", [b.context.context_step(committed, c)
                                                      for b, c in zip(backends, caches)]))
    block = block_with_masks(batch)
    prefix = int(caches[0].lengths[0])
    for t in (1.0, 0.5, 1.0 / block_size):
        rows.append(StepLogits(f"denoiser (prefix {prefix}, t={t:.3g})",
                               denoise(block, torch.full((batch,), t))))
    candidate = backends[-1].denoiser
    if not hasattr(candidate, "denoiser_unmask_step"):
        return rows, None
    tt = block.eq(config.mask_token_id).float().mean(-1)
    fused, _, _ = candidate.denoiser_unmask_step(block, tt, caches[-1].to(candidate.device),
                                                 UNMASK_THRESHOLD, UNMASK_STEPS_LEFT)
    return rows, UnmaskRun("fused unmask (tokens differing)", block, denoise(block, tt),
                           fused.cpu())


def compare_steps(reference: Backend, candidate: Backend, config: TwoTowerConfig,
                  max_context: int, block_size: int = 16,
                  prefill_lengths: tuple[int, ...] = (1, 7, 13),
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> list[StepParity]:
    """An fp32 candidate against the fp32 reference: every step's logits within ``tolerance``
    relative, and the fused unmask commits exactly the policy's tokens on the reference's
    logits."""
    steps, unmask = run_steps([reference, candidate], config, max_context, block_size,
                              prefill_lengths, seed)
    rows = [StepParity(s.step, *_errors(s.logits[1], s.logits[0]), tolerance) for s in steps]
    if unmask is not None:
        rows.append(_unmask_row(unmask, config))
    return rows


def compare_steps_reduced(reference: Backend, reference_fp32: Backend, candidate: Backend,
                          config: TwoTowerConfig, max_context: int, block_size: int = 16,
                          prefill_lengths: tuple[int, ...] = (1, 7, 13), seed: int = 0,
                          criterion: Optional[DriftCriterion] = None,
                          batch: int = REDUCED_BATCH) -> ReducedParity:
    """A bf16/fp16 candidate against the reference in its dtype (``reference``, on the
    candidate's devices) and in fp32, every step bounded by the references' own drift on the
    same inputs (``DriftCriterion.for_dtype`` of the candidate unless given). The fused unmask
    counts committed tokens that the policy commits from none of the three backends' logits."""
    criterion = criterion or DriftCriterion.for_dtype(candidate.dtype)
    steps, unmask = run_steps([reference_fp32, reference, candidate], config, max_context,
                              block_size, prefill_lengths, seed, batch)
    rows = [DriftParity(s.step, divergence(s.logits[1], s.logits[0]),
                        divergence(s.logits[2], s.logits[1]), divergence(s.logits[2], s.logits[0]),
                        criterion) for s in steps]
    unmask_row = None
    if unmask is not None:
        allowed = [policy_next_block(unmask.block, logits, config.mask_token_id)
                   for logits in unmask.logits]
        mismatches = float(unmask_mismatches(unmask.fused, allowed))
        unmask_row = StepParity(unmask.step, mismatches, mismatches,
                                float(criterion.unmask_slack))
    return ReducedParity(rows, unmask_row, criterion)


def _generate(backend: Backend, config: TwoTowerConfig, max_context: int,
              prompts: list[list[int]], settings: GenerationSettings, fused_unmask: bool = False
              ) -> list[RequestResult]:
    with TwoTowerSession(backend.context, backend.denoiser, config, max_context,
                         backend.dtype, fused_unmask=fused_unmask) as session:
        return session.generate([Request(p, settings) for p in prompts])


def _agreement(a: list[RequestResult], b: list[RequestResult]) -> float:
    """Fraction of generated positions where both produced the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra.tokens, rb.tokens))
    total = sum(max(len(ra.tokens), len(rb.tokens)) for ra, rb in zip(a, b))
    return same / total if total else 1.0


FP8_FLIP_NUDGE = 2.0 ** -20  # a few fp32 ulps: more than ONNX Runtime and torch differ by


def compare_steps_fp8(reference: Backend, candidate: Backend, model: Any,
                      config: TwoTowerConfig, max_context: int, block_size: int = 16,
                      tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
                      ) -> list[StepParity]:
    """fp8 graphs against the fp8-quantised reference. Two fp32 executors differ in an
    activation's last bits, and where it lies that close to an E4M3 rounding boundary they
    round it to neighbouring codes (docs/quantization.md). The reference measures that
    itself: its fp8 activations nudged by ±2⁻²⁰ before rounding, on the same inputs. Every step
    must be within ``tolerance`` or twice the largest change the nudge shows, and at least
    half the steps within ``tolerance`` (a wrong scale or layout moves every step)."""
    from ..reference.quantized import rounding_nudge

    steps, unmask = run_steps([reference, candidate], config, max_context, block_size,
                              seed=seed)
    drift = 0.0
    for sign in (1.0, -1.0):
        with rounding_nudge(model, sign * FP8_FLIP_NUDGE):
            nudged, _ = run_steps([reference], config, max_context, block_size, seed=seed)
        drift = max([drift] + [_errors(n.logits[0], s.logits[0])[1]
                               for n, s in zip(nudged, steps)])
    bound = max(tolerance, 2 * drift)
    rows = [StepParity(s.step, *_errors(s.logits[1], s.logits[0]), bound) for s in steps]
    beyond = sum(r.max_rel > tolerance for r in rows) / len(rows)
    rows.append(StepParity(f"steps beyond {tolerance:g} (fraction)", beyond, beyond, 0.5))
    if unmask is not None:
        rows.append(_unmask_row(unmask, config))
    return rows


def _unmask_row(unmask: UnmaskRun, config: TwoTowerConfig) -> StepParity:
    expected = policy_next_block(unmask.block, unmask.logits[0], config.mask_token_id)
    mismatches = float((unmask.fused != expected).sum())
    return StepParity(unmask.step, mismatches, mismatches, 0.0)


def compare_generation(reference: Backend, candidate: Backend, config: TwoTowerConfig,
                       max_context: int, prompts: list[list[int]],
                       settings: list[GenerationSettings], fused_unmask: bool = False
                       ) -> list[GenerationParity]:
    """Greedy generations of both backends in each mode, token for token (fp32 candidates)."""
    rows = []
    for s in settings:
        a = _generate(reference, config, max_context, prompts, s)
        b = _generate(candidate, config, max_context, prompts, s, fused_unmask)
        rows.append(GenerationParity(
            s.mode, all(ra.tokens == rb.tokens for ra, rb in zip(a, b)), _agreement(a, b),
            sum(r.stats.denoiser_evals for r in a), sum(r.stats.denoiser_evals for r in b)))
    return rows


def compare_generation_reduced(reference: Backend, reference_fp32: Backend, candidate: Backend,
                               config: TwoTowerConfig, max_context: int,
                               prompts: list[list[int]], settings: list[GenerationSettings],
                               fused_unmask: bool = False) -> list[GenerationDrift]:
    """Greedy generations of a reduced-precision candidate and both references, each mode's
    token agreement beside the reference's own agreement with fp32."""
    rows = []
    for s in settings:
        fp32 = _generate(reference_fp32, config, max_context, prompts, s)
        same = _generate(reference, config, max_context, prompts, s)
        cand = _generate(candidate, config, max_context, prompts, s, fused_unmask)
        rows.append(GenerationDrift(s.mode, _agreement(cand, same), _agreement(cand, fp32),
                                    _agreement(same, fp32)))
    return rows


def format_table(steps: list[StepParity], generations: Optional[list[GenerationParity]] = None
                 ) -> str:
    lines = [f"{'step':40} {'max abs':>11} {'max rel':>11} {'tolerance':>10}  result",
             "-" * 84]
    for r in steps:
        lines.append(f"{r.step:40} {r.max_abs:11.3e} {r.max_rel:11.3e} {r.tolerance:10.1e}  "
                     f"{'ok' if r.passed else 'FAIL'}")
    if generations:
        lines += ["", f"{'mode':12} {'tokens equal':>12} {'agreement':>10} "
                      f"{'ref evals':>10} {'evals':>8}  result", "-" * 66]
        for g in generations:
            lines.append(f"{g.mode:12} {str(g.tokens_equal):>12} {g.agreement:10.3f} "
                         f"{g.reference_evals:10d} {g.candidate_evals:8d}  "
                         f"{'ok' if g.passed else 'FAIL'}")
    return "\n".join(lines)


def format_reduced_table(report: ReducedParity,
                         generations: Optional[list[GenerationDrift]] = None) -> str:
    """The reduced-precision report: per step the references' drift beside the candidate's
    divergence from each (medians over positions, bounded; the maximum, reported), the worst
    statistic over its bound, then pooled top-1, the fused unmask and the generations."""
    c = report.criterion
    lines = [f"criterion: median log p error and KL within {c.multiple:g} x (KL: "
             f"{c.multiple:g}^2 x) the references' own drift + floor {c.floor:.2g}; pooled "
             f"top-1 within {c.top1_slack:g} of the reference's",
             "",
             f"{'':32} {'log p error (median)':^30} {'max':>8} {'KL (median)':^30} "
             f"{'max':>8}",
             f"{'step':32} {'drift':>9} {'vs dtype':>10} {'vs fp32':>9} {'vs fp32':>8} "
             f"{'drift':>9} {'vs dtype':>10} {'vs fp32':>9} {'vs fp32':>8} {'top-1':>6} "
             f"{'worst/bound':>11}  result", "-" * 140]
    for r in report.steps:
        lines.append(
            f"{r.step:32} {r.drift.logprob_median:9.2e} {r.vs_reference.logprob_median:10.2e} "
            f"{r.vs_fp32.logprob_median:9.2e} {r.vs_fp32.logprob_max:8.2e} "
            f"{r.drift.kl_median:9.2e} {r.vs_reference.kl_median:10.2e} "
            f"{r.vs_fp32.kl_median:9.2e} {r.vs_fp32.kl_max:8.2e} {r.vs_fp32.top1:6.3f} "
            f"{r.worst:11.3f}  {'ok' if r.passed else 'FAIL'}")
    lines += ["", f"top-1 agreement with fp32 over all steps: reference "
                  f"{report.reference_top1:.3f}, candidate {report.candidate_top1:.3f} (at least "
                  f"{c.top1_bound(report.reference_top1):.3f})  "
                  f"{'ok' if report.top1_passed else 'FAIL'}"]
    if report.unmask is not None:
        u = report.unmask
        lines.append(f"{u.step}: {u.max_abs:g} that no backend's logits explain (at most "
                     f"{u.tolerance:g})  {'ok' if u.passed else 'FAIL'}")
    if generations:
        lines += ["", "greedy generations, token agreement (reported: one flipped near tie "
                      "changes every later token):",
                  f"{'mode':12} {'vs dtype ref':>12} {'vs fp32':>9} {'ref vs fp32':>12}",
                  "-" * 48]
        lines += [f"{g.mode:12} {g.agreement:12.3f} {g.agreement_fp32:9.3f} "
                  f"{g.reference_agreement:12.3f}" for g in generations]
    return "\n".join(lines)
