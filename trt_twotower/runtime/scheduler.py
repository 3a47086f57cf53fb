"""The one step loop: rounds over the live rows of every request, whatever its mode.

A round writes a call to each tower that has none under way (``tower_work.py``). The context
tower's call opens the rows admitted since its last call and pushes, in one go, the next chunk
of each prefilling prompt (within a token budget, so that a long prompt cannot stall the other
rows), the blocks that resolved (T = S) and the tokens sampled (T = 1); the AR rows' next tokens
are sampled there, from logits that never leave the tower. The denoiser's call takes the cache
deltas of the context calls answered since its last one and runs one diffusion step over every
row in the middle of a block that no context call holds, and one mock-AR step. The calls serve
disjoint rows, so towers on two devices (or in two Triton models) run them at the same time,
each at its own pace: a round waits for the first answer, not for both. A row that finishes or
is cancelled leaves once no call under way touches it, and its slot is freed at once. Rows with
different settings share every call: γ, the steps left, the timestep, the temperature, the seed
and the step key are per row.

Block size groups the calls (a block step is [rows, S]); a TensorRT engine is built for one S,
so a server fixes it, while steps per block are each request's own (they only bound its loop).
The towers hold ``capacity`` rows in pools allocated once; nothing is allocated per request.
Decoding rules come from ``trt_twotower.policy`` only, applied inside the towers.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationError, TokenScore
from .cache import CacheFullError
from .rows import DENOISE, FINISHED, PREFILL, SAMPLE, Request, Row
from .tower_work import (FROM_TOWER, ContextResult, ContextWork, Delta, DenoiseGroup,
                         DenoiserResult, DenoiserWork, ExtendGroup, MockGroup, Ref, Sample,
                         TowerPair)


@dataclass(frozen=True)
class SchedulerLimits:
    """How much one loop holds and does per round."""

    capacity: int = 64               # cache slots: rows live at once, per tower
    prefill_tokens: int = 256        # prompt tokens pushed through the context tower per round
    # AR tokens a row takes per round when every live row is AR: the context tower
    # feeds each sampled token back itself, so calls, answers and round trips per token drop
    # by this factor; streamed a round's tokens at a time
    ar_steps: int = 4

    def __post_init__(self) -> None:
        for name in ("capacity", "prefill_tokens", "ar_steps"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class _ContextFlight:
    """A context call under way, and what the loop needs to take its answer."""
    answer: "Future[Optional[ContextResult]]"
    work: ContextWork
    prefilling: list[Row]
    by_ref: dict[Ref, Row]

    @property
    def refs(self) -> set[Ref]:
        return {ref for group in self.work.groups for ref in group.rows} | set(self.work.opened)


@dataclass
class _DenoiserFlight:
    """A denoiser call under way, and what the loop needs to take its answer."""
    answer: "Future[Optional[DenoiserResult]]"
    work: DenoiserWork
    denoise: list[Row]
    mock: list[Row]
    by_ref: dict[Ref, Row]

    @property
    def refs(self) -> set[Ref]:
        return {r.ref for r in self.denoise + self.mock}


class StepScheduler:
    """The loop's state and its rounds. Not thread-safe: one thread drives ``round`` (the
    in-process engine's worker, the Triton orchestrator's, or ``run`` for a fixed batch)."""

    def __init__(self, towers: TowerPair, config: TwoTowerConfig, max_context: int,
                 limits: SchedulerLimits = SchedulerLimits()) -> None:
        self.towers, self.config, self.max_context = towers, config, max_context
        self.limits = limits
        self.capacity = min(limits.capacity, towers.capacity)
        self.waiting: list[Row] = []
        self.rows: list[Row] = []
        self._carried: list[Delta] = []   # landed context calls' deltas, for the denoiser
        # calls under way, their answers not taken, per tower in the order written (two only
        # while one is written ahead)
        self._context_flights: list[_ContextFlight] = []
        self._denoiser_flights: list[_DenoiserFlight] = []
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
        row = Row(request, self.config.mask_token_id)
        self.waiting.append(row)
        return row

    def reset(self) -> None:
        """Forget every row (after a failed round): the towers free what they still hold."""
        for answer in self._answers():
            try:
                answer.result()
            except Exception:  # noqa: BLE001 - the round's own error is the one reported
                pass
        self._context_flights, self._denoiser_flights = [], []
        for row in self.waiting + self.rows:
            row.phase = FINISHED
        self.waiting, self.rows, self._carried = [], [], []
        self.towers.forget()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows and not self._answers()

    def run(self) -> None:
        """Rounds until every queued request has finished."""
        while not self.idle:
            self.round()

    def _answers(self) -> list[Future]:
        flights: list = self._context_flights + self._denoiser_flights
        return [f.answer for f in flights]

    def _admit(self) -> list[Row]:
        """Waiting requests into free slots, opened by this round's context call: none while
        a context call is under way, unless AR rows alone are written ahead (then AR
        requests only, in turn)."""
        admitted: list[Row] = []
        if self._context_flights and not self._writes_ahead(self.rows):
            return admitted
        while self.waiting and len(self.rows) < self.capacity:
            row = self.waiting[0]
            if self._context_flights and row.settings.mode != "ar":
                break
            self.waiting.pop(0)
            if row.cancel_requested:
                row.result.cancelled, row.phase = True, FINISHED
                continue
            row.ref = self.towers.new_ref()
            self.rows.append(row)
            admitted.append(row)
        return admitted

    def _denoises_ahead(self) -> bool:
        """The next denoiser call may start before the one under way is answered: its
        diffusion rows go on from the blocks the tower's last step left them (``FROM_TOWER``),
        so the tower computes while the loop takes the last answer and writes the next."""
        return self.towers.ahead and len(self._denoiser_flights) == 1

    def _writes_ahead(self, rows: list[Row]) -> bool:
        """The next context call may start before the one under way is answered: towers that
        run calls in order, AR rows alone, one call under way."""
        live = [r for r in rows if r.phase != FINISHED]
        return (self.towers.ahead and bool(live) and len(self._context_flights) == 1
                and all(r.settings.mode == "ar" for r in live))

    def _arriving(self, admits: bool) -> bool:
        """Whether the context call being written steps AR rows one token only, since
        requests are arriving: over towers that write AR calls ahead, the call that admits
        one and a call written while that one is under way. An arrival waits for the call
        computing and the one written ahead; four-token calls then kept a burst of arrivals
        (a closed loop's wave, sent back over gRPC over ~20 ms) out of step with the rows
        already decoding, and the calls short of rows. Measured, 16 AR clients through Triton, alternating runs:
        +7.6 % tokens/s twice (8 and 6 pairs), +15 % a third time (6 pairs, each above 1);
        64 clients: no change beyond the noise (0.937 without, 0.938 with, re-measured with
        the heap frozen)."""
        return self.towers.ahead and (admits or any(f.work.opened
                                                    for f in self._context_flights))

    # --- one round -------------------------------------------------------------------------
    def round(self) -> None:
        """Admit; take the answers already back; write a call to each tower that has none
        under way and start it (at once where the towers live apart); wait for an answer and
        take every one that is back: emit AR tokens, blocks and mock-AR tokens; free the rows
        that finished and are in no call.

        The calls touch disjoint rows, so neither waits for the other: the context call takes
        the rows that must push something (a prompt chunk, a resolved block, a sampled token)
        and the denoiser call the rows that need nothing pushed and are in no context call,
        with the deltas of the context calls answered since its last call. Where the towers
        live apart each runs at its own pace: a long prefill in the context tower holds back
        only the rows it serves, never the denoiser's rows. A row whose block resolves spends
        a context call out of the denoiser before its next block starts.

        Calls of AR rows alone over towers that run calls in order (``ahead``) overlap: a
        call starts before the last one's answers are taken, since an AR row's next input is
        the token the tower sampled for it (``FROM_TOWER``) and its step keys and budget are
        claimed as a call is written. The tower computes while the loop takes the last
        answers, streams them and writes the next call."""
        admitted = self._admit()
        for row in self.rows:
            if row.cancel_requested and row.phase != FINISHED:
                row.result.cancelled, row.phase = True, FINISHED
        self._land(wait=False)
        wrote = self._write(admitted)
        # after a call that a second may follow ahead, the next round writes that one first
        self._land(wait=not (wrote and (self._writes_ahead(self.rows)
                                        or self._denoises_ahead())))
        self._drop_finished()
        self.rounds += 1

    def _write(self, admitted: list[Row]) -> bool:
        """A call to each tower that is free (and has work), started; whether one was."""
        live = [r for r in self.rows if r.phase != FINISHED]
        by_ref = {r.ref: r for r in self.rows}
        work, prefilling = None, []
        if not self._context_flights or self._writes_ahead(live):
            # AR rows chain tokens only in calls of AR rows alone: a longer context call
            # would hold back every diffusion and mock-AR row waiting on it
            alone = all(r.settings.mode == "ar" for r in live)
            arriving = self._arriving(bool(admitted))
            work, prefilling = self._context_work(
                live, self.limits.ar_steps if alone and not arriving else 1)
            work.opened = [r.ref for r in admitted]
        dwork, denoise, mock = None, [], []
        if not self._denoiser_flights or self._denoises_ahead():
            busy = set().union(*(f.refs for f in self._context_flights))
            if work is not None:
                busy |= {ref for group in work.groups for ref in group.rows}
            denoise = [r for r in live if r.phase == DENOISE and r.commit is None
                       and r.ref not in busy]
            busy |= {r.ref for f in self._denoiser_flights for r in f.mock}
            mock = [r for r in live
                    if r.phase == SAMPLE and r.mock and r.token is None and r.ref not in busy]
            dwork = self._denoiser_work(denoise, mock, by_ref)
        work = None if work is None or work.empty else work
        dwork = None if dwork is None or dwork.empty else dwork
        if work is None and dwork is None:
            return False
        pending = self.towers.start(work, dwork)
        if work is not None:
            self._context_flights.append(_ContextFlight(pending.context, work, prefilling,
                                                        by_ref))
        if dwork is not None:
            self._carried = []
            self._denoiser_flights.append(_DenoiserFlight(pending.denoiser, dwork, denoise,
                                                          mock, by_ref))
        return True

    def _denoiser_work(self, denoise: list[Row], mock: list[Row], by_ref: dict[Ref, Row]
                       ) -> DenoiserWork:
        """The deltas carried so far and a step for ``denoise`` and ``mock``; a row is opened
        on the denoiser with its first delta (its prompt's). A row stepping in the call under
        way goes on from the block that step leaves it (``FROM_TOWER``) unless the loop saw
        that block resolve since."""
        deltas = [d for d in self._carried if d.row in by_ref]
        opened = []
        for row in [by_ref[d.row] for d in deltas] + denoise + mock:
            if not row.on_denoiser:
                row.on_denoiser = True
                opened.append(row.ref)
        under_way = {r.ref for f in self._denoiser_flights for r in f.denoise}
        going_on = {r.ref for r in denoise
                    if r.ref in under_way and r.block_index == r.written_block}
        for row in denoise:
            row.written_block = row.block_index
        return DenoiserWork(opened=opened, deltas=deltas,
                            groups=self._denoise_groups(denoise, going_on),
                            mock=self._mock_group(mock))

    def _land(self, wait: bool) -> None:
        """Take the answers that are back (each tower's in the order written); ``wait``:
        first wait for one, if any call is under way."""
        oldest: list = self._context_flights[:1] + self._denoiser_flights[:1]
        answers = [f.answer for f in oldest]
        if wait and answers:
            futures_wait(answers, return_when=FIRST_COMPLETED)
        while self._context_flights and self._context_flights[0].answer.done():
            flight = self._context_flights.pop(0)
            result = flight.answer.result()
            self._carried.extend(result.deltas)
            self._took_context_call(flight.work, result, flight.prefilling, flight.by_ref)
        while self._denoiser_flights and self._denoiser_flights[0].answer.done():
            dflight = self._denoiser_flights.pop(0)
            dresult = dflight.answer.result()
            for row in dflight.denoise + dflight.mock:
                row.charge("denoise_seconds", dresult.seconds)
            _share(dflight.denoise + dflight.mock, dresult.crossed)
            self._took_denoiser_step(dflight.work, dresult.blocks, dflight.mock,
                                     dresult.tokens, dflight.by_ref)

    def _took_context_call(self, work: ContextWork, result: ContextResult,
                           prefilling: list[Row], by_ref: dict[Ref, Row]) -> None:
        """The context call's time and bytes charged to the rows it served, its tokens
        emitted."""
        served = list({ref: by_ref[ref] for g in work.groups for ref in g.rows}.values())
        completed = set(prefilling)
        for row in served:
            prefill = row.phase == PREFILL or row in completed
            row.charge("prefill_seconds" if prefill else "commit_seconds", result.seconds)
        _share(served, result.crossed)
        self._took_context_step(work, result, by_ref)
        for row in served:
            if row.sampled and row.phase != FINISHED:
                tokens, row.sampled = row.sampled, []
                self._emit_tokens(row, tokens, row.sampled_scores)

    def _drop_finished(self) -> None:
        """Free the finished rows that no call under way still touches."""
        touched = set().union(*(f.refs for f in self._context_flights))
        for dflight in self._denoiser_flights:
            touched |= dflight.refs
        kept, freed = [], []
        for row in self.rows:
            if row.phase == FINISHED and row.ref not in touched:
                freed.append(row.ref)
            else:
                kept.append(row)
        self.rows = kept
        if freed:
            self.towers.release(freed)
        self.towers.settle(self.idle)

    # --- the context call ------------------------------------------------------------------
    def _context_work(self, live: list[Row], chain: int) -> tuple[ContextWork, list[Row]]:
        """Prefill chunks (rows whose chunks have one length and all end their prompt, or all
        do not, push together), then each block size's commits, then every T = 1 token (AR
        rows taking up to ``chain`` tokens); returns the work and the rows whose prompt it
        completes."""
        work, prefilling, budget = ContextWork(), [], self.limits.prefill_tokens
        tokens = [r for r in live if r.wants_token]  # before this call's own samples
        chunked: list[Row] = []
        chunk_of: dict[Row, list[int]] = {}
        latest: list[Row] = []
        for row in (r for r in live if r.phase == PREFILL):
            if budget <= 0:
                break
            if row.pending and row.scores_prompt:
                budget -= self._scored_prefill(work, row, budget)
            elif row.pending:
                chunk_of[row], row.pending = row.pending[:budget], row.pending[budget:]
                budget -= len(chunk_of[row])
                chunked.append(row)
            if not row.pending:
                prefilling.append(row)
                row.phase = DENOISE if row.diffusion else SAMPLE
                if row.mock:
                    latest.append(row)
        def ends(r: Row) -> bool:  # its prompt's last chunk: an AR row samples its first token
            return not r.pending and not r.mock
        for group in _groups(chunked, lambda r: (len(chunk_of[r]), ends(r))):
            work.groups.append(_group(group, torch.tensor([chunk_of[r] for r in group]),
                                      sample=ends(group[0])))
        if latest:  # mock-AR: its latest prompt token, keeping the states before it
            work.groups.append(_group(latest, torch.tensor([[r.latest] for r in latest]),
                                      keep_previous=True))
        commits = [r for r in live if r.commit is not None]
        for group in _groups(commits, lambda r: r.settings.block_size):
            work.groups.append(_group(group, torch.stack([r.commit for r in group])))
        if tokens:
            work.groups.append(_group(tokens, torch.tensor([[r.token] for r in tokens]),
                                      sample=True, keep_previous=True, chain=chain))
        return work, prefilling

    @staticmethod
    def _scored_prefill(work: ContextWork, row: Row, budget: int) -> int:
        """Echo with logprobs: the prompt goes in a token at a time (one group each, all in
        this call), each step scoring the prompt's next token; returns the tokens pushed."""
        prompt = row.request.prompt_ids
        pushed = 0
        while row.pending and pushed < budget:
            index = len(prompt) - len(row.pending)
            token, row.pending = row.pending[0], row.pending[1:]
            target = prompt[index + 1] if index + 1 < len(prompt) else None
            sample = Sample(row.settings, 0, target) if target is not None else \
                row.claim_sample()
            work.groups.append(ExtendGroup([row.ref], torch.tensor([[token]]), [row.mirrored],
                                           [False], [sample]))
            if sample is not None and sample.target is None:
                row.token = FROM_TOWER
            pushed += 1
        return pushed

    def _took_context_step(self, work: ContextWork, result: ContextResult,
                           by_ref: dict[Ref, Row]) -> None:
        for group, sampled, scored in zip(work.groups, result.tokens, result.scores):
            for ref, taken, scores, sample in zip(group.rows, sampled, scored, group.sample):
                row = by_ref[ref]
                if row.phase == FINISHED:  # it ended while this call was under way
                    continue
                row.result.stats.context_steps += max(1, len(taken))
                if sample is not None and sample.target is not None:
                    row.result.prompt_logprobs.extend(scores)
                elif taken:
                    row.sampled, row.sampled_scores = taken, scores

    # --- the denoiser call -----------------------------------------------------------------
    def _denoise_groups(self, rows: list[Row], going_on: set[Ref]) -> list[DenoiseGroup]:
        """One group per block size; a row in ``going_on`` sends FROM_TOWER for its block,
        step key and steps left."""
        def block(r: Row) -> torch.Tensor:
            return torch.full_like(r.block, FROM_TOWER) if r.ref in going_on else r.block

        def own(r: Row, value: int) -> int:
            return FROM_TOWER if r.ref in going_on else value
        return [DenoiseGroup([r.ref for r in g], torch.stack([block(r) for r in g]),
                             [r.settings for r in g], [own(r, r.diffusion_key) for r in g],
                             [own(r, r.settings.steps_per_block - r.step_in_block) for r in g])
                for g in _groups(rows, lambda r: r.settings.block_size)]

    @staticmethod
    def _mock_group(rows: list[Row]) -> Optional[MockGroup]:
        if not rows:
            return None
        return MockGroup([r.ref for r in rows], [r.latest for r in rows],
                         [r.settings for r in rows], [r.step for r in rows])

    def _took_denoiser_step(self, work: DenoiserWork, blocks: list[torch.Tensor],
                            mock: list[Row], tokens: list[int], by_ref: dict[Ref, Row]
                            ) -> None:
        for delta in work.deltas:
            by_ref[delta.row].result.stats.handoff_bytes += delta.size
        mask_id = self.config.mask_token_id
        for group, nxt in zip(work.groups, blocks):
            skipped = (nxt[:, 0] == FROM_TOWER).tolist()  # its block resolved a step before
            masked = (nxt == mask_id).any(dim=1).tolist()
            for i, ref in enumerate(group.rows):
                row = by_ref[ref]
                if row.phase == FINISHED or skipped[i]:  # or cancelled meanwhile
                    continue
                steps_left = row.settings.steps_per_block - row.step_in_block
                row.block = nxt[i].clone()
                row.step_in_block += 1
                row.result.stats.denoiser_evals += 1
                if not policy.block_resolved(masked[i], steps_left):
                    continue
                row.emit(row.block.tolist(), self.config.eos_token_id)
                row.step_in_block, row.block_index = 0, row.block_index + 1
                if row.phase != FINISHED:
                    row.commit = row.block
                row.block = torch.full_like(row.block, mask_id)
        for row, token in zip(mock, tokens):
            if row.phase != FINISHED:
                row.result.stats.denoiser_evals += 1
                self._emit_tokens(row, [token])

    def _emit_tokens(self, row: Row, tokens: list[int], scores: list[TokenScore] = ()
                     ) -> None:
        """AR or mock-AR tokens: kept, streamed as one delta, and (mock-AR; AR rows push
        FROM_TOWER) the last pushed through the context tower next round unless the row is
        finished."""
        row.emit(tokens, self.config.eos_token_id, scores)
        if row.phase != FINISHED and row.mock:
            row.latest, row.step = tokens[-1], row.step + len(tokens)
            row.token = tokens[-1]


def _share(rows: list[Row], crossed: int) -> None:
    """Split a call's boundary bytes between the (distinct) rows it served."""
    for row in rows:
        row.result.stats.boundary_bytes += crossed // len(rows)


def _group(rows: list[Row], ids: torch.Tensor, sample: bool = False,
           keep_previous: bool = False, chain: int = 1) -> ExtendGroup:
    """A context step over ``rows``; what they push is taken, and an AR row that samples
    pushes that token next (``FROM_TOWER``)."""
    samples = [r.claim_sample(chain) if sample else None for r in rows]
    for row, claimed in zip(rows, samples):
        row.commit, row.token = None, None if claimed is None else FROM_TOWER
    return ExtendGroup([r.ref for r in rows], ids, [r.mirrored for r in rows],
                       [keep_previous and r.mock for r in rows], samples)


def _groups(rows: list[Row], key: Callable[[Row], object]) -> list[list[Row]]:
    groups: dict[object, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return list(groups.values())
