"""Parity of a backend with the PyTorch reference: every step type and whole generations.

Both sides start from the same inputs and each carries its own cache, so an error in a state
update shows up in the later steps' logits. Errors are max |a − b| / max |b| over a step's
logits (b the reference), with random, fixed-seed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationSettings
from .cache import StepCache
from .executor import ContextExecutor, DenoiserExecutor
from .session import Request, TwoTowerSession

DEFAULT_TOLERANCE = 1e-4  # fp32 graphs vs fp32 reference, relative


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
class Backend:
    context: ContextExecutor
    denoiser: DenoiserExecutor
    dtype: torch.dtype = torch.float32


def _errors(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = float((candidate.float() - reference.float()).abs().max())
    return diff, diff / max(float(reference.float().abs().max()), 1e-30)


def compare_steps(reference: Backend, candidate: Backend, config: TwoTowerConfig,
                  max_context: int, block_size: int = 16, prefill_lengths: tuple[int, ...] = (1, 7, 13),
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> list[StepParity]:
    """Prefill of several lengths, a decode step (T = 1), a block commit (T = S), denoiser
    steps at several timesteps and prefix lengths (0 included), mock-AR, fused unmask."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[StepParity] = []

    def record(step: str, cand: torch.Tensor, ref: torch.Tensor) -> None:
        rows.append(StepParity(step, *_errors(cand, ref), tolerance))

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(4, config.vocab_size, shape, generator=gen)

    def block_with_masks(batch: int) -> torch.Tensor:
        block = ids(batch, block_size)
        block[torch.rand(block.shape, generator=gen) < 0.6] = config.mask_token_id
        return block

    batch = 2
    caches = [StepCache.allocate(config, batch, max_context, b.dtype, b.context.device)
              for b in (reference, candidate)]
    block = block_with_masks(batch)
    for t in (1.0, 0.5):
        tt = torch.full((batch,), t)
        record(f"denoiser (prefix 0, t={t})",
               candidate.denoiser.denoiser_step(block, tt, caches[1]),
               reference.denoiser.denoiser_step(block, tt, caches[0]))
    for length in prefill_lengths:
        prompt = ids(batch, length)
        caches = [StepCache.allocate(config, batch, max_context, b.dtype, b.context.device)
                  for b in (reference, candidate)]
        record(f"prefill T={length}", candidate.context.context_step(prompt, caches[1]),
               reference.context.context_step(prompt, caches[0]))
    snapshots = [c.snapshot_mamba() for c in caches]
    token = ids(batch, 1)
    record("decode T=1", candidate.context.context_step(token, caches[1]),
           reference.context.context_step(token, caches[0]))
    views = [c.one_token_back(s) for c, s in zip(caches, snapshots)]
    record("mock-AR step", candidate.denoiser.mock_ar_step(token, views[1]),
           reference.denoiser.mock_ar_step(token, views[0]))
    committed = ids(batch, block_size)
    record(f"commit T={block_size}", candidate.context.context_step(committed, caches[1]),
           reference.context.context_step(committed, caches[0]))
    block = block_with_masks(batch)
    for t in (1.0, 0.5, 1.0 / block_size):
        tt = torch.full((batch,), t)
        ref_logits = reference.denoiser.denoiser_step(block, tt, caches[0])
        record(f"denoiser (prefix {int(caches[0].lengths[0])}, t={t:.3g})",
               candidate.denoiser.denoiser_step(block, tt, caches[1]), ref_logits)
    if hasattr(candidate.denoiser, "denoiser_unmask_step"):
        tt = block.eq(config.mask_token_id).float().mean(-1)
        ref_logits = reference.denoiser.denoiser_step(block, tt, caches[0])
        pred, conf = policy.diffusion_predictions(ref_logits, config.mask_token_id)
        expected, _ = policy.commit_step(block, pred, conf, config.mask_token_id, 0.5, 3)
        nxt, _, _ = candidate.denoiser.denoiser_unmask_step(block, tt, caches[1], 0.5, 3)
        mismatches = float((nxt.cpu() != expected).sum())
        rows.append(StepParity("fused unmask (tokens differing)", mismatches, mismatches, 0.0))
    return rows


def compare_generation(reference: Backend, candidate: Backend, config: TwoTowerConfig,
                       max_context: int, prompts: list[list[int]],
                       settings: list[GenerationSettings], fused_unmask: bool = False
                       ) -> list[GenerationParity]:
    """Greedy generations of both backends in each mode, token for token."""
    ref = TwoTowerSession(reference.context, reference.denoiser, config, max_context,
                          reference.dtype)
    cand = TwoTowerSession(candidate.context, candidate.denoiser, config, max_context,
                           candidate.dtype, fused_unmask=fused_unmask)
    rows = []
    for s in settings:
        a = ref.generate([Request(p, s) for p in prompts])
        b = cand.generate([Request(p, s) for p in prompts])
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra.tokens, rb.tokens))
        total = sum(max(len(ra.tokens), len(rb.tokens)) for ra, rb in zip(a, b))
        rows.append(GenerationParity(
            s.mode, all(ra.tokens == rb.tokens for ra, rb in zip(a, b)),
            same / total if total else 1.0,
            sum(r.stats.denoiser_evals for r in a), sum(r.stats.denoiser_evals for r in b)))
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
