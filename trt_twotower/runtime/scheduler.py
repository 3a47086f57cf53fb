"""The one step loop: rounds over the live rows of every request, whatever its mode.

Each round admits waiting requests into free cache slots and pushes their prompts through the
context tower a chunk at a time (a long prompt cannot stall the other rows), runs one batched
denoiser step over every diffusion row in the middle of a block, one batched mock-AR step, and
then one batched context step per token count: the blocks that just resolved (T = S) and the AR
and mock-AR tokens (T = 1). A row that finishes or is cancelled leaves at the end of the round
and its slot is free for the next admission. Rows with different settings share every call:
γ, the steps left, the timestep, the temperature, the seed and the step key are per row.

Block size groups the denoiser calls (a block step is [rows, S]); a TensorRT engine is built
for one S, so a server fixes it, while steps per block are each request's own (they only bound
its loop). The caches are two pools of ``capacity`` rows allocated once (the context tower's on
its device, the denoiser's mirror on its own), indexed by slot; nothing is allocated per
request. Decoding rules come from ``trt_twotower.policy`` only.
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

PREFILL, DENOISE, SAMPLE, FINISHED = "prefill", "denoise", "sample", "finished"


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


@dataclass(frozen=True)
class SchedulerLimits:
    """How much one loop holds and does per round."""

    capacity: int = 64               # cache slots: rows live at once, per tower
    prefill_tokens: int = 256        # prompt tokens pushed through the context tower per round

    def __post_init__(self) -> None:
        for name in ("capacity", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name} must be at least 1, got {getattr(self, name)}")


class Row:
    """One admitted request: its slot in both pools and where it is in its generation."""

    def __init__(self, request: Request, slot: int, mask_id: int) -> None:
        self.request, self.slot = request, slot
        self.settings = request.settings
        self.result = RequestResult()
        self.phase = PREFILL
        prompt = request.prompt_ids
        self.mock = self.settings.mode == "mock-ar"
        # mock-AR keeps its last prompt token back: it is the first "latest" token (§5.2)
        self.pending = list(prompt[:-1] if self.mock else prompt)
        self.latest = prompt[-1]
        self.block = torch.full((self.settings.block_size,), mask_id, dtype=torch.long)
        self.block_index = self.step_in_block = self.step = 0
        self.logits: Optional[torch.Tensor] = None
        self.cancel_requested = False

    @property
    def diffusion(self) -> bool:
        return self.settings.mode == "diffusion"

    @property
    def mirrored(self) -> bool:
        """The denoiser reads this row's context cache: diffusion and mock-AR, not AR."""
        return self.settings.mode != "ar"

    @property
    def diffusion_key(self) -> int:
        return self.block_index * self.settings.steps_per_block + self.step_in_block

    def charge(self, phase: str, seconds: float) -> None:
        stats = self.result.stats
        setattr(stats, phase, getattr(stats, phase) + seconds)

    def emit(self, ids: list[int], eos: int) -> None:
        """Keep ids (within budget, through EOS), stream them, finish on EOS, budget or a
        cancelling callback."""
        result = self.result
        ids, done = policy.accept_tokens(len(result.tokens), ids, self.settings, eos)
        result.tokens.extend(ids)
        on_delta = self.request.on_delta
        if on_delta is not None and ids and on_delta(ids) is False:
            result.cancelled = done = True
        if done:
            self.phase = FINISHED


def _timed(rows: list[Row], phase: str, call: Callable, *args):
    """Run a batched call and charge its time to every row it served."""
    start = time.perf_counter()
    out = call(*args)
    elapsed = time.perf_counter() - start
    for row in rows:
        row.charge(phase, elapsed)
    return out


class SlotPool:
    """Both towers' caches for ``capacity`` rows: the context tower's and the denoiser's
    mirror, each allocated once on its device, plus mock-AR's "S−2" Mamba snapshots."""

    def __init__(self, config: TwoTowerConfig, capacity: int, max_context: int,
                 dtype: torch.dtype, context_device: torch.device,
                 denoiser_device: torch.device) -> None:
        self.context = StepCache.allocate(config, capacity, max_context, dtype, context_device)
        self.mirror = StepCache.allocate(config, capacity, max_context, dtype, denoiser_device)
        self.snapshot = {n: torch.zeros_like(self.mirror.tensors[n])
                         for n in self.mirror.mamba_names()}
        self.free = list(range(capacity - 1, -1, -1))

    def take(self) -> int:
        """A free slot, emptied: length 0 hides its old keys and values, and its Mamba states
        start from zero as a new sequence's do."""
        slot = self.free.pop()
        for cache in (self.context, self.mirror):
            cache.lengths[slot] = 0
            for name in cache.mamba_names():
                cache.tensors[name][slot].zero_()
        return slot

    def give_back(self, slot: int) -> None:
        self.free.append(slot)


def gather(cache: StepCache, slots: list[int]) -> StepCache:
    """The rows of ``slots`` as one cache: views when they are consecutive (the executor then
    writes the pool itself), otherwise a copy (``scatter`` writes it back)."""
    return StepCache({n: gather_tensor(t, slots) for n, t in cache.tensors.items()},
                     gather_tensor(cache.lengths, slots), cache.max_context)


def gather_tensor(tensor: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Rows ``slots`` of a pool tensor: a view of consecutive rows, else an indexed copy."""
    first = slots[0]
    if slots == list(range(first, first + len(slots))):
        return tensor[first:first + len(slots)]
    return tensor.index_select(0, torch.tensor(slots, dtype=torch.long, device=tensor.device))


def scatter(cache: StepCache, slots: list[int], rows: StepCache) -> None:
    """Write rows computed on a gathered copy back into the pool (no-op for views)."""
    if rows.lengths.data_ptr() == cache.lengths[slots[0]:].data_ptr():
        return
    index = torch.tensor(slots, dtype=torch.long, device=cache.device)
    for name, tensor in cache.tensors.items():
        tensor.index_copy_(0, index, rows.tensors[name])
    cache.lengths.index_copy_(0, index, rows.lengths)


class StepScheduler:
    """The loop's state and its rounds. Not thread-safe: one thread drives ``round`` (the
    in-process engine's worker, a Triton orchestrator, or ``run`` for a fixed batch)."""

    def __init__(self, context: ContextExecutor, denoiser: DenoiserExecutor,
                 config: TwoTowerConfig, max_context: int, dtype: torch.dtype = torch.float32,
                 fused_unmask: bool = False, limits: SchedulerLimits = SchedulerLimits()
                 ) -> None:
        self.context, self.denoiser = context, denoiser
        self.config, self.max_context, self.dtype = config, max_context, dtype
        self.fused_unmask = fused_unmask and hasattr(denoiser, "denoiser_unmask_step")
        self.limits = limits
        self.pool: Optional[SlotPool] = None
        self.waiting: list[Row] = []
        self.rows: list[Row] = []
        self.rounds = 0

    # --- admission -----------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse a request that can never run, before it waits or takes a slot."""
        ids = request.prompt_ids
        if not ids:
            raise GenerationError("a prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise GenerationError(f"prompt ids must lie in [0, {self.config.vocab_size})")
        total = len(ids) + request.settings.max_new_tokens
        if total > self.max_context:
            raise CacheFullError(
                f"prompt ({len(ids)} tokens) + max_new_tokens "
                f"({request.settings.max_new_tokens}) = {total} exceeds the maximum context "
                f"of {self.max_context}")

    def add(self, request: Request) -> Row:
        """Queue a checked request; it is admitted at the start of the next round with a free
        slot."""
        self.check(request)
        row = Row(request, -1, self.config.mask_token_id)
        self.waiting.append(row)
        return row

    def reset(self) -> None:
        """Forget every row (after a failed round): all slots free, pools empty."""
        for row in self.waiting + self.rows:
            row.phase = FINISHED
        self.waiting, self.rows = [], []
        if self.pool is not None:
            for slot in range(self.limits.capacity):
                if slot not in self.pool.free:
                    self.pool.give_back(slot)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows

    def run(self) -> None:
        """Rounds until every queued request has finished."""
        while not self.idle:
            self.round()

    def _admit(self) -> None:
        if self.pool is None:
            self.pool = SlotPool(self.config, self.limits.capacity, self.max_context,
                                 self.dtype, self.context.device, self.denoiser.device)
        while self.waiting and self.pool.free:
            row = self.waiting.pop(0)
            if row.cancel_requested:
                row.result.cancelled, row.phase = True, FINISHED
                continue
            row.slot = self.pool.take()
            self.rows.append(row)

    # --- one round -------------------------------------------------------------------------
    def round(self) -> None:
        """Admit, prefill a chunk, denoise, sample, then the context steps; drop the rows
        that finished."""
        self._admit()
        for row in self.rows:
            if row.cancel_requested and row.phase != FINISHED:
                row.result.cancelled, row.phase = True, FINISHED
        self._prefill([r for r in self.rows if r.phase == PREFILL])
        commits = self._denoise([r for r in self.rows if r.phase == DENOISE])
        tokens = self._mock_ar([r for r in self.rows if r.phase == SAMPLE and r.mock])
        tokens += self._sample_ar([r for r in self.rows if r.phase == SAMPLE and not r.mock])
        if commits:
            self._context_step(commits, torch.stack([r.block for r in commits]),
                               "commit_seconds")
            for row in commits:
                row.block_index += 1
                row.block.fill_(self.config.mask_token_id)
        if tokens:
            self._context_step(tokens, torch.tensor([[r.latest] for r in tokens]),
                               "commit_seconds", keep_previous=True)
        self._drop_finished()
        self.rounds += 1

    def _drop_finished(self) -> None:
        kept = []
        for row in self.rows:
            if row.phase == FINISHED:
                self.pool.give_back(row.slot)
            else:
                kept.append(row)
        self.rows = kept

    # --- prefill ---------------------------------------------------------------------------
    def _prefill(self, rows: list[Row]) -> None:
        """Each prefilling row takes its next chunk, one row at a time (lengths differ),
        within the round's prompt-token budget; a row whose prompt is in moves on."""
        budget = self.limits.prefill_tokens
        for row in rows:
            if budget <= 0:
                break
            if row.pending:
                chunk, row.pending = row.pending[:budget], row.pending[budget:]
                budget -= len(chunk)
                self._context_step([row], torch.tensor([chunk]), "prefill_seconds")
            if not row.pending:
                self._start(row)

    def _start(self, row: Row) -> None:
        """The prompt is in: diffusion starts its first block, AR samples from the prefill's
        logits, mock-AR first pushes its latest prompt token (keeping the states before it)."""
        if row.mock:
            self._context_step([row], torch.tensor([[row.latest]]), "prefill_seconds",
                               keep_previous=True)
        row.phase = DENOISE if row.diffusion else SAMPLE

    # --- denoiser ----------------------------------------------------------------------------
    def _denoise(self, rows: list[Row]) -> list[Row]:
        """One denoiser step for every row mid-block; returns the rows whose block resolved
        and that go on (to be committed this round)."""
        resolved = []
        for group in _groups(rows, lambda r: (r.settings.block_size, self._fused(r))):
            self._denoise_group(group)
            for row in group:
                row.step_in_block += 1
                row.result.stats.denoiser_evals += 1
                masks_left = bool((row.block == self.config.mask_token_id).any())
                if masks_left and row.step_in_block < row.settings.steps_per_block:
                    continue
                row.step_in_block = 0
                row.emit(row.block.tolist(), self.config.eos_token_id)
                if row.phase != FINISHED:
                    resolved.append(row)
        return resolved

    def _fused(self, row: Row) -> bool:
        s = row.settings
        return self.fused_unmask and s.temperature <= 0.0 and s.forced_commits is None

    def _denoise_group(self, rows: list[Row]) -> None:
        mask_id = self.config.mask_token_id
        block = torch.stack([r.block for r in rows])
        t = (block == mask_id).float().mean(-1)
        steps_left = torch.tensor([r.settings.steps_per_block - r.step_in_block for r in rows])
        cache = gather(self.pool.mirror, [r.slot for r in rows])
        start = time.perf_counter()
        if self._fused(rows[0]):
            gamma = torch.tensor([r.settings.confidence_threshold for r in rows])
            nxt, _, _ = self.denoiser.denoiser_unmask_step(block, t, cache, gamma, steps_left)
            nxt = nxt.to(block.device)
        else:
            logits = self.denoiser.denoiser_step(block, t, cache)
            nxt = torch.cat([self._commit(r, logits[i:i + 1], block[i:i + 1],
                                          int(steps_left[i])) for i, r in enumerate(rows)])
        elapsed = time.perf_counter() - start
        for i, row in enumerate(rows):
            row.block = nxt[i].clone()
            row.charge("denoise_seconds", elapsed)

    def _commit(self, row: Row, logits: torch.Tensor, block: torch.Tensor, steps_left: int
                ) -> torch.Tensor:
        s, mask_id = row.settings, self.config.mask_token_id
        pred, conf = policy.diffusion_predictions(logits, mask_id, s.temperature,
                                                  torch.tensor([s.seed]), row.diffusion_key)
        nxt, _ = policy.commit_step(block, pred, conf, mask_id, s.confidence_threshold,
                                    steps_left, s.forced_commits)
        return nxt

    def _mock_ar(self, rows: list[Row]) -> list[Row]:
        """Mock-AR: the denoiser's next token from each row's latest token over its mirror one
        token back; returns the rows whose token goes on to the context tower."""
        if not rows:
            return []
        slots = [r.slot for r in rows]
        view = gather(self.pool.mirror, slots)
        view = view.one_token_back({n: gather_tensor(t, slots)
                                    for n, t in self.pool.snapshot.items()})
        latest = torch.tensor([[r.latest] for r in rows])
        logits = _timed(rows, "denoise_seconds", self.denoiser.mock_ar_step, latest, view)
        for row in rows:
            row.result.stats.denoiser_evals += 1
        return self._emit_samples(rows, logits)

    def _sample_ar(self, rows: list[Row]) -> list[Row]:
        if not rows:
            return []
        return self._emit_samples(rows, torch.cat([r.logits for r in rows]))

    def _emit_samples(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        going_on = []
        for i, row in enumerate(rows):
            token = int(policy.sample_next(logits[i:i + 1], row.settings,
                                           torch.tensor([row.settings.seed]), row.step)[0])
            row.emit([token], self.config.eos_token_id)
            if row.phase != FINISHED:
                row.latest, row.step = token, row.step + 1
                going_on.append(row)
        return going_on

    # --- context tower -------------------------------------------------------------------------
    def _context_step(self, rows: list[Row], ids: torch.Tensor, phase: str,
                      keep_previous: bool = False) -> None:
        """One context step over ``rows``' slots; mirrors what changed to the denoiser's pool
        for the rows that read it and leaves each AR row its logits. ``keep_previous`` first
        keeps mock-AR rows' mirrored Mamba states: the "S−2" view of their next step."""
        pool, slots = self.pool, [r.slot for r in rows]
        for row in rows:
            if keep_previous and row.mock:
                for name, snap in pool.snapshot.items():
                    snap[row.slot] = pool.mirror.tensors[name][row.slot]
        cache = gather(pool.context, slots)
        before = cache.lengths.clone()
        logits = _timed(rows, phase, self.context.context_step, ids, cache)
        scatter(pool.context, slots, cache)
        for i, row in enumerate(rows):
            row.result.stats.context_steps += 1
            if row.mirrored:
                row.result.stats.handoff_bytes += self._mirror(row.slot, int(before[i]))
            if not row.mirrored:
                row.logits = logits[i:i + 1]

    def _mirror(self, slot: int, old: int) -> int:
        """Copy a slot's new positions and its Mamba states to the denoiser's pool; returns
        the bytes moved."""
        src, dst = self.pool.context, self.pool.mirror
        new = int(src.lengths[slot])
        moved = 0
        for name in src.kv_names():
            piece = src.tensors[name][slot, :, old:new]
            dst.tensors[name][slot, :, old:new] = piece.to(dst.device)
            moved += piece.numel() * piece.element_size()
        for name in src.mamba_names():
            piece = src.tensors[name][slot]
            dst.tensors[name][slot] = piece.to(dst.device)
            moved += piece.numel() * piece.element_size()
        dst.lengths[slot] = new
        return moved


def _groups(rows: list[Row], key: Callable[[Row], object]) -> list[list[Row]]:
    groups: dict[object, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return list(groups.values())
