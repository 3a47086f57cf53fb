"""The decoding policy: the one place where TwoTower's commit and sampling rules are written.

Every executor (PyTorch reference, ONNX Runtime, TensorRT), the fused confidence-unmask op and
the Triton orchestrator call these functions, so that all of them commit the same tokens.
Spec §5.1 (mask diffusion) and §5.2/§5.3 (token sampling for mock-AR and AR).

Two deliberate, documented departures from the original code keep batched generation equal to
each request run alone: the timestep ``t`` is each row's own masked fraction (the original
takes the batch mean), and EOS stops only the row that produced it. For one request both are
identical to the original. Ties in the remasking order are broken by position: among equal
confidences the earlier position is committed first (the original used an unstable sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import TwoTowerError

MASK_LOGIT = -1e12  # what the MDLM step writes into the mask token's logit (spec §5.1)
GUMBEL_U_MIN = 1e-10

MODES = ("diffusion", "mock-ar", "ar")
MAX_LOGPROBS = 20


class GenerationError(TwoTowerError, ValueError):
    """Generation settings that cannot be run."""


@dataclass(frozen=True)
class GenerationSettings:
    """What a caller asks of one generation; validated on creation."""

    mode: str = "diffusion"
    max_new_tokens: int = 64
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.8  # the card's operating point (docs/decisions.md)
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    stop_at_eos: bool = True
    forced_commits: Optional[int] = None  # benchmarks: commit exactly K per step
    logprobs: Optional[int] = None  # AR: each token's log-probability and this many top ones
    echo: bool = False              # also score every prompt token after the first

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GenerationError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise GenerationError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.steps_per_block, int) or self.steps_per_block < 1:
            raise GenerationError(
                f"steps_per_block must be at least 1, got {self.steps_per_block!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.mode == "diffusion" and self.max_new_tokens % self.block_size:
            raise GenerationError(
                f"max_new_tokens={self.max_new_tokens} is not a multiple of "
                f"block_size={self.block_size}: diffusion generates whole blocks "
                f"(use {blocks_needed(self.max_new_tokens, self.block_size) * self.block_size})")
        if not 0.0 <= self.confidence_threshold <= 1.0 or math.isnan(self.confidence_threshold):
            raise GenerationError(
                f"confidence_threshold must lie in [0, 1], got {self.confidence_threshold!r}")
        if not self.temperature >= 0.0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.forced_commits is not None and not 1 <= self.forced_commits <= self.block_size:
            raise GenerationError(f"forced_commits must lie in [1, block_size], got "
                                  f"{self.forced_commits!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise GenerationError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got "
                                  f"{self.logprobs!r}")
        if self.logprobs is not None and self.mode != "ar":
            raise GenerationError("logprobs score tokens by AR's next-token distribution, "
                                  "which only mode 'ar' samples from: send mode 'ar'")


def blocks_needed(max_new_tokens: int, block_size: int) -> int:
    """How many whole blocks cover ``max_new_tokens`` (callers that round up use this)."""
    return -(-max_new_tokens // block_size)


# --- mask diffusion (spec §5.1) -------------------------------------------------------------

def suppress_mask(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """fp32 copy of the logits in which the mask token can never win."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = MASK_LOGIT
    return logits


def diffusion_predictions(
    logits: torch.Tensor,
    mask_token_id: int,
    temperature: float = 0.0,
    seeds: Optional[torch.Tensor] = None,
    step_key: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position the predicted token and its confidence (the *untempered* probability).

    logits: [B, S, V]. Greedy (argmax, first index on ties) at temperature 0, otherwise
    Gumbel-max sampling from the tempered distribution with counter-based noise
    (``gumbel_noise``), keyed by each row's seed and ``step_key``.
    """
    masked_logits = suppress_mask(logits, mask_token_id)
    log_probs = torch.log_softmax(masked_logits, dim=-1)
    if temperature <= 0.0:
        pred = log_probs.argmax(dim=-1)
    else:
        tempered = torch.log_softmax(masked_logits / temperature, dim=-1)
        pred = (tempered + gumbel_noise(_row_seeds(seeds, logits), step_key,
                                        tuple(logits.shape[1:]))).argmax(-1)
    confidence = log_probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1).exp()
    return pred, confidence


# --- counter-based noise ----------------------------------------------------------------------
# Sampling noise is a pure function of (request seed, step key, position, token id), so a row's
# samples never depend on its batch neighbours, and the CUDA unmask kernel and the ONNX graphs
# can reproduce them bit for bit. The mixer is the 32-bit finaliser of MurmurHash3.

_U32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h & _U32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def counter_uniform(seeds: torch.Tensor, step_key: int, shape: tuple[int, ...]) -> torch.Tensor:
    """u in (0, 1) of shape [B, *shape]: hash(seed, step_key, flat position, last index).

    The last axis of ``shape`` is the token id; the axes before it flatten to a position.
    """
    seeds = seeds.to(torch.int64).reshape(-1, *([1] * len(shape)))
    device = seeds.device
    last = torch.arange(shape[-1], dtype=torch.int64, device=device)
    n_pos = math.prod(shape[:-1])
    pos = torch.arange(n_pos, dtype=torch.int64, device=device).reshape(*shape[:-1], 1)
    h = _fmix32(seeds)
    h = _fmix32(h ^ (step_key & _U32))
    h = _fmix32(h ^ pos)
    h = _fmix32(h ^ last)
    return ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def gumbel_noise(seeds: torch.Tensor, step_key: int, shape: tuple[int, ...]) -> torch.Tensor:
    """-log(-log(u)) with u from ``counter_uniform`` clamped >= 1e-10, as fp32."""
    u = counter_uniform(seeds, step_key, shape).clamp_min(GUMBEL_U_MIN)
    return (-torch.log(-torch.log(u))).float()


def _row_seeds(seeds: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    if seeds is None or seeds.numel() != logits.shape[0]:
        raise GenerationError("sampling with temperature > 0 needs one seed per batch row")
    return seeds.to(logits.device)


def commit_counts(masked: torch.Tensor, confidence: torch.Tensor,
                  threshold: Union[float, torch.Tensor], steps_left: Union[int, torch.Tensor],
                  forced: Optional[int] = None) -> torch.Tensor:
    """How many masked positions each row commits this step.

    masked: bool [B, S]; confidence: [B, S]; steps_left = T - s (1 on the last step).
    Last step: all. Otherwise max(#(conf > γ) or 1, ceil(n / steps_left)), at most n.
    ``threshold`` and ``steps_left`` are one value for every row or one per row ([B]): rows of
    different requests share a step. ``forced`` (benchmarks only) commits exactly that many,
    independent of the weights.
    """
    n = masked.sum(-1)
    if forced is not None:
        return torch.clamp(n, max=forced)
    gamma = torch.as_tensor(threshold, dtype=confidence.dtype, device=confidence.device)
    steps = torch.as_tensor(steps_left, dtype=torch.int64, device=n.device).reshape(-1)
    above = ((confidence > gamma.reshape(-1, 1)) & masked).sum(-1)
    k = torch.where(above == 0, torch.ones_like(above), above)
    divisor = steps.clamp_min(1)
    min_commit = torch.div(n + divisor - 1, divisor, rounding_mode="floor")
    return torch.where(steps <= 1, n, torch.minimum(torch.maximum(k, min_commit), n))


def block_resolved(masks_left: bool, steps_left: int) -> bool:
    """A block is done after a step that left no mask or was its last (``steps_left`` 1, the
    steps it had before that step): the loop and a tower going on from its own last step
    decide it alike."""
    return not masks_left or steps_left <= 1


def commit_step(
    block: torch.Tensor,
    pred: torch.Tensor,
    confidence: torch.Tensor,
    mask_token_id: int,
    threshold: Union[float, torch.Tensor],
    steps_left: Union[int, torch.Tensor],
    forced: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One diffusion step's commit: returns (next block ids, confidences used).

    Committed tokens are never revised; among masked positions the most confident are
    committed, ties going to the earlier position. Unmasked positions report +inf confidence.
    """
    masked = block == mask_token_id
    conf = torch.where(masked, confidence.float(), torch.full_like(confidence.float(), math.inf))
    count = commit_counts(masked, conf, threshold, steps_left, forced)
    # Rank masked positions by (confidence desc, position asc); stable sort keeps index order.
    ranking_key = torch.where(masked, conf, torch.full_like(conf, -math.inf))
    order = torch.sort(ranking_key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(block.shape[-1], device=block.device).expand_as(order))
    commit = masked & (rank < count.unsqueeze(-1))
    return torch.where(commit, pred, block), conf


# --- token sampling for AR and mock-AR (spec §5.2, §5.3) -------------------------------------

def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seeds: Optional[torch.Tensor] = None,
    step_key: int = 0,
) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: greedy at temperature 0, otherwise
    temperature → top-k → top-p → a categorical draw (Gumbel-max with counter-based noise)."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    noise = gumbel_noise(_row_seeds(seeds, logits), step_key, (logits.shape[-1],))
    return (torch.log_softmax(logits, -1) + noise).argmax(-1)


def sample_next(logits: torch.Tensor, settings: GenerationSettings, seeds: torch.Tensor,
                step_key: int) -> torch.Tensor:
    """AR and mock-AR's next tokens [B] under a request's sampling settings."""
    return sample_tokens(logits, settings.temperature, settings.top_k, settings.top_p, seeds,
                         step_key)


@dataclass(frozen=True)
class TokenScore:
    """A token's log-probability under the context tower's next-token distribution (before
    temperature, top-k or top-p), and the ``top`` most likely tokens with theirs."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def score_token(logits: torch.Tensor, token: int, top: int) -> TokenScore:
    """Score ``token`` against next-token logits [V] (or [1, V])."""
    logp = torch.log_softmax(logits.float().reshape(-1), -1)
    best = torch.topk(logp, top) if top else None
    pairs = () if best is None else tuple(
        (int(i), float(v)) for i, v in zip(best.indices.tolist(), best.values.tolist()))
    return TokenScore(int(token), float(logp[token]), pairs)


# --- what a request keeps of the tokens it is given ----------------------------------------

def accept_tokens(produced: int, ids: list[int], settings: GenerationSettings, eos_token_id: int
                  ) -> tuple[list[int], bool]:
    """Of ``ids`` just committed for a request that already has ``produced`` tokens: the ones
    it keeps (within its budget, through its first EOS when it stops there) and whether it is
    now finished."""
    ids = ids[:max(0, settings.max_new_tokens - produced)]
    done = False
    if settings.stop_at_eos and eos_token_id in ids:
        ids = ids[:ids.index(eos_token_id) + 1]
        done = True
    return ids, done or produced + len(ids) >= settings.max_new_tokens
