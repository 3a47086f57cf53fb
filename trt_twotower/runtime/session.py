"""``TwoTowerSession``: two tower executors on their devices turned into text, fast.

The session owns every cache. The context tower's cache lives on the context device; the
denoiser reads a mirror on its own device, and after each context step only what changed is
copied across (the new positions' keys/values and the Mamba states), never the prefix again.
Requests of one batch may have different prompts, seeds, lengths and stopping points; a row
that finishes or is cancelled leaves the batch (its cache rows are freed) and costs no more
work. Decoding rules come from ``trt_twotower.policy`` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationError, GenerationSettings
from .cache import CacheFullError, StepCache
from .executor import ContextExecutor, DenoiserExecutor

# A streaming callback gets each committed block's ids (a token at a time in AR modes);
# returning False cancels the request.
OnDelta = Callable[[list[int]], Optional[bool]]

SHARED_SETTINGS = ("mode", "block_size", "steps_per_block", "confidence_threshold",
                   "temperature", "top_k", "top_p", "forced_commits")


@dataclass
class Request:
    prompt_ids: list[int]
    settings: GenerationSettings
    on_delta: Optional[OnDelta] = None


@dataclass
class RequestStats:
    denoiser_evals: int = 0
    context_steps: int = 0
    handoff_bytes: int = 0
    prefill_seconds: float = 0.0
    denoise_seconds: float = 0.0
    commit_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.denoise_seconds + self.commit_seconds


@dataclass
class RequestResult:
    tokens: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    cancelled: bool = False

    @property
    def tokens_per_eval(self) -> float:
        evals = self.stats.denoiser_evals
        return len(self.tokens) / evals if evals else float("nan")


class _Batch:
    """The live rows: which request each cache row serves, plus both caches."""

    def __init__(self, requests: list[Request], results: list[RequestResult],
                 context_cache: StepCache, mirror: StepCache) -> None:
        self.requests, self.results = requests, results
        self.rows = list(range(len(requests)))
        self.context_cache, self.mirror = context_cache, mirror
        self.snapshot: dict[str, torch.Tensor] = {}
        self.done = [False] * len(requests)

    def seeds(self) -> torch.Tensor:
        return torch.tensor([self.requests[r].settings.seed for r in self.rows])

    def charge(self, phase: str, seconds: float) -> None:
        for r in self.rows:
            stats = self.results[r].stats
            setattr(stats, phase, getattr(stats, phase) + seconds)

    def emit(self, position: int, ids: list[int], eos: int) -> None:
        """Append ids to a row's output (through its first EOS), stream them, and mark the
        request done on EOS, on reaching its token budget or on cancellation."""
        r = self.rows[position]
        request, result = self.requests[r], self.results[r]
        ids, self.done[r] = policy.accept_tokens(len(result.tokens), ids, request.settings, eos)
        result.tokens.extend(ids)
        if request.on_delta is not None and ids and request.on_delta(ids) is False:
            result.cancelled = self.done[r] = True

    def drop_finished(self) -> list[int]:
        """Free the cache rows of finished requests; returns the kept positions."""
        keep = [p for p, r in enumerate(self.rows) if not self.done[r]]
        if len(keep) != len(self.rows):
            self.rows = [self.rows[p] for p in keep]
            self.context_cache = self.context_cache.select_rows(keep)
            self.mirror = self.mirror.select_rows(keep)
            if self.snapshot:
                index = torch.tensor(keep, dtype=torch.long, device=self.mirror.device)
                self.snapshot = {n: t.index_select(0, index) for n, t in self.snapshot.items()}
        return keep


def denoise_and_commit(denoiser: DenoiserExecutor, block: torch.Tensor, t: torch.Tensor,
                       cache: StepCache, s: GenerationSettings, seeds: torch.Tensor,
                       step_key: int, mask_token_id: int, fused_unmask: bool) -> torch.Tensor:
    """One diffusion step wherever the denoiser runs (this session, a Triton tower model): the
    next block ids, by the fused unmask op when the executor has it and the step is greedy,
    otherwise logits then the policy. Step ``step_key`` of a block of ``steps_per_block``."""
    steps_left = s.steps_per_block - step_key % s.steps_per_block
    if fused_unmask and s.temperature <= 0.0 and s.forced_commits is None:
        nxt, _, _ = denoiser.denoiser_unmask_step(block, t, cache, s.confidence_threshold,
                                                  steps_left)
        return nxt.to(block.device)
    logits = denoiser.denoiser_step(block, t, cache)
    pred, conf = policy.diffusion_predictions(logits, mask_token_id, s.temperature, seeds,
                                              step_key)
    nxt, _ = policy.commit_step(block, pred, conf, mask_token_id, s.confidence_threshold,
                                steps_left, s.forced_commits)
    return nxt


class TwoTowerSession:
    """Generation over a context executor and a denoiser executor (same or other device)."""

    def __init__(self, context: ContextExecutor, denoiser: DenoiserExecutor,
                 config: TwoTowerConfig, max_context: int, dtype: torch.dtype = torch.float32,
                 fused_unmask: bool = False) -> None:
        self.context, self.denoiser = context, denoiser
        self.config, self.max_context, self.dtype = config, max_context, dtype
        self.fused_unmask = fused_unmask and hasattr(denoiser, "denoiser_unmask_step")

    # --- public ------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[RequestResult]:
        """Run a batch of requests to completion; results in the order of ``requests``."""
        self._validate(requests)
        results = [RequestResult() for _ in requests]
        batch = _Batch(requests, results,
                       StepCache.allocate(self.config, len(requests), self.max_context,
                                          self.dtype, self.context.device),
                       StepCache.allocate(self.config, len(requests), self.max_context,
                                          self.dtype, self.denoiser.device))
        mode = requests[0].settings.mode
        {"diffusion": self._diffusion, "ar": self._ar, "mock-ar": self._mock_ar}[mode](batch)
        return results

    # --- checks --------------------------------------------------------------------------
    def _validate(self, requests: list[Request]) -> None:
        if not requests:
            raise GenerationError("no requests to run")
        first = requests[0].settings
        for request in requests:
            for name in SHARED_SETTINGS:
                if getattr(request.settings, name) != getattr(first, name):
                    raise GenerationError(f"requests batched together must share {name}")
            ids = request.prompt_ids
            if not ids:
                raise GenerationError("a prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise GenerationError(f"prompt ids must lie in [0, {self.config.vocab_size})")
            total = len(ids) + request.settings.max_new_tokens
            if total > self.max_context:
                raise CacheFullError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens "
                    f"({request.settings.max_new_tokens}) = {total} exceeds the maximum "
                    f"context of {self.max_context}")

    # --- cache handoff -----------------------------------------------------------------------
    def _sync_mirror(self, batch: _Batch, previous_lengths: torch.Tensor) -> None:
        """Copy to the denoiser's mirror only the positions each row just wrote, plus the
        Mamba states; count the bytes per request."""
        src, dst = batch.context_cache, batch.mirror
        new_lengths = src.lengths.tolist()
        for p, (old, new) in enumerate(zip(previous_lengths.tolist(), new_lengths)):
            moved = 0
            for name in src.kv_names():
                piece = src.tensors[name][p, :, old:new]
                dst.tensors[name][p, :, old:new] = piece.to(dst.device)
                moved += piece.numel() * piece.element_size()
            for name in src.mamba_names():
                piece = src.tensors[name][p]
                dst.tensors[name][p] = piece.to(dst.device)
                moved += piece.numel() * piece.element_size()
            batch.results[batch.rows[p]].stats.handoff_bytes += moved
        dst.lengths.copy_(src.lengths.to(dst.device))

    def _context_step(self, batch: _Batch, ids: torch.Tensor, mirror: bool,
                      phase: str = "commit_seconds") -> torch.Tensor:
        start = time.perf_counter()
        before = batch.context_cache.lengths.clone()
        logits = self.context.context_step(ids, batch.context_cache)
        if mirror:
            self._sync_mirror(batch, before)
        for r in batch.rows:
            batch.results[r].stats.context_steps += 1
        batch.charge(phase, time.perf_counter() - start)
        return logits

    def _prefill(self, batch: _Batch, prompts: list[list[int]], mirror: bool) -> torch.Tensor:
        """Each row's prompt on its own (lengths differ), then one mirror sync for all."""
        start = time.perf_counter()
        before = batch.context_cache.lengths.clone()
        logits = []
        for p, ids in enumerate(prompts):
            if ids:
                logits.append(self.context.context_step(torch.tensor([ids]),
                                                        batch.context_cache.row(p)))
                batch.results[batch.rows[p]].stats.context_steps += 1
        if mirror:
            self._sync_mirror(batch, before)
        batch.charge("prefill_seconds", time.perf_counter() - start)
        return torch.cat(logits) if logits else torch.empty(0)

    # --- modes -------------------------------------------------------------------------------
    def _diffusion(self, batch: _Batch) -> None:
        s = batch.requests[0].settings
        mask_id, eos = self.config.mask_token_id, self.config.eos_token_id
        self._prefill(batch, [batch.requests[r].prompt_ids for r in batch.rows], mirror=True)
        block_index = 0
        while batch.rows:
            block = torch.full((len(batch.rows), s.block_size), mask_id, dtype=torch.long)
            start = time.perf_counter()
            for step in range(s.steps_per_block):
                masked = block == mask_id
                needs = masked.any(-1)
                if not needs.any():
                    break
                block = self._denoise(batch, block, masked.float().mean(-1), s,
                                      block_index * s.steps_per_block + step)
                for p in torch.nonzero(needs).flatten().tolist():
                    batch.results[batch.rows[p]].stats.denoiser_evals += 1
            batch.charge("denoise_seconds", time.perf_counter() - start)
            for p, ids in enumerate(block.tolist()):
                batch.emit(p, ids, eos)
            keep = batch.drop_finished()
            if not batch.rows:
                break
            self._context_step(batch, block[keep], mirror=True)
            block_index += 1

    def _denoise(self, batch: _Batch, block: torch.Tensor, t: torch.Tensor,
                 s: GenerationSettings, step_key: int) -> torch.Tensor:
        return denoise_and_commit(self.denoiser, block, t, batch.mirror, s, batch.seeds(),
                                  step_key, self.config.mask_token_id, self.fused_unmask)

    def _sample(self, batch: _Batch, logits: torch.Tensor, step_key: int) -> torch.Tensor:
        return policy.sample_next(logits, batch.requests[0].settings, batch.seeds(), step_key)

    def _ar(self, batch: _Batch) -> None:
        eos = self.config.eos_token_id
        logits = self._prefill(batch, [batch.requests[r].prompt_ids for r in batch.rows],
                               mirror=False)
        step = 0
        while batch.rows:
            token = self._sample(batch, logits, step)
            for p, value in enumerate(token.tolist()):
                batch.emit(p, [value], eos)
            keep = batch.drop_finished()
            if not batch.rows:
                break
            logits = self._context_step(batch, token[keep][:, None], mirror=False)
            step += 1

    def _mock_ar(self, batch: _Batch) -> None:
        """The denoiser as a next-token head over caches one token back (spec §5.2)."""
        eos = self.config.eos_token_id
        prompts = [batch.requests[r].prompt_ids for r in batch.rows]
        self._prefill(batch, [ids[:-1] for ids in prompts], mirror=True)
        latest = torch.tensor([[ids[-1]] for ids in prompts])
        batch.snapshot = batch.mirror.snapshot_mamba()
        self._context_step(batch, latest, mirror=True, phase="prefill_seconds")
        step = 0
        while batch.rows:
            start = time.perf_counter()
            logits = self.denoiser.mock_ar_step(latest, batch.mirror.one_token_back(batch.snapshot))
            for r in batch.rows:
                batch.results[r].stats.denoiser_evals += 1
            token = self._sample(batch, logits, step)
            batch.charge("denoise_seconds", time.perf_counter() - start)
            for p, value in enumerate(token.tolist()):
                batch.emit(p, [value], eos)
            keep = batch.drop_finished()
            if not batch.rows:
                break
            latest = token[keep][:, None]
            batch.snapshot = batch.mirror.snapshot_mamba()
            self._context_step(batch, latest, mirror=True)
            step += 1
