"""Each tower's half of a round: its executor over a pool of cache slots allocated once, and the
decoding policy applied where the logits are.

``ContextSlots`` holds the context tower's caches; ``DenoiserSlots`` holds the denoiser's copy
of them plus mock-AR's one-token-back Mamba states. Both take batched steps over any set of
slots, each row with its own settings, so requests of every mode and setting share a step.
The same two classes serve the in-process engine (``local_towers.py``) and the Triton tower
models (``trt_twotower.serve.towers``); logits never leave them.
"""

from __future__ import annotations

import heapq
from typing import Optional

import numpy as np
import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationError, GenerationSettings, TokenScore
from .cache import StepCache
from .cache_delta import apply_delta, pack_delta
from .executor import ContextExecutor, DenoiserExecutor
from .tower_work import FROM_TOWER, Sample


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


class FreeSlots:
    """A pool's free slots, the lowest handed out first: live rows stay packed at the bottom
    of the pool, so a step's rows lie side by side (a view of the pool) or nearly so (a span,
    ``WriteBatch``) whatever order requests leave in. Handed out last-freed-first, they could
    end up anywhere, and every step would copy its rows out and back. The in-process towers
    and the Triton tower models both allocate from one."""

    def __init__(self, capacity: int) -> None:
        self._heap = list(range(capacity))

    def take(self) -> int:
        return heapq.heappop(self._heap)

    def give(self, slot: int) -> None:
        heapq.heappush(self._heap, slot)

    def __len__(self) -> int:
        return len(self._heap)


# A span of the pool steps whole, its idle rows' state kept aside and put back, when it holds
# at most one idle row per this many stepping rows; more idle rows are copied around instead.
# Measured on the CPU (built-in model, 64 AR rows): a row's step costs ~0.17 ms per token,
# copying a row out and back ~0.05 ms, so an idle row's wasted step is worth ~3.5 copies.
SPAN_ROWS_PER_IDLE = 4


class WriteBatch:
    """Rows ``slots`` (ascending) of a pool as one batch that a context step writes.

    Side by side in the pool, they are a view of it. With a few idle slots between them (a
    slot freed and not yet taken again, a row prefilling in another group of the call), the
    whole span steps as a view and each idle row's state is kept aside and put back after:
    its wasted step costs less than copying every stepping row out and back, which is what
    rows spread further apart still get (``gather``, then ``scatter``)."""

    def __init__(self, pool: StepCache, slots: list[int], pad_id: int) -> None:
        self.pool, self.slots, self.pad_id = pool, slots, pad_id
        first, last = slots[0], slots[-1]
        stepping = set(slots)
        idle = [s for s in range(first, last + 1) if s not in stepping]
        self.kept: Optional[StepCache] = None
        self.idle = idle
        self.rows: Optional[list[int]] = None     # the stepping rows' places in the span
        stepped = slots
        if idle and len(idle) * SPAN_ROWS_PER_IDLE <= len(slots):
            self.kept = pool.select_rows(idle)
            pool.lengths[idle] = 0   # an idle row's wasted step needs room, wherever it was
            self.rows = [s - first for s in slots]
            stepped = list(range(first, last + 1))
        self.cache = gather(pool, stepped)   # a view, unless rows spread out are copied

    def step(self, executor: ContextExecutor, ids: torch.Tensor) -> torch.Tensor:
        """One context step of ids [R, T] for the stepping rows: their logits [R, V]."""
        if self.rows is None:
            return executor.context_step(ids, self.cache)
        span = torch.full((self.cache.batch, ids.shape[1]), self.pad_id, dtype=ids.dtype)
        span[self.rows] = ids
        return executor.context_step(span, self.cache)[self.rows]

    def close(self) -> None:
        """Put the idle rows back, or write copied rows into the pool (views wrote it)."""
        if self.kept is not None:
            scatter(self.pool, self.idle, self.kept)
        else:
            scatter(self.pool, self.slots, self.cache)


def _empty(cache: StepCache, slot: int) -> None:
    """Length 0 hides a slot's old keys and values; its Mamba states start from zero as a
    new sequence's do."""
    cache.lengths[slot] = 0
    for name in cache.mamba_names():
        cache.tensors[name][slot].zero_()


def _next_tokens(logits: torch.Tensor, rows: list[int], settings: list[GenerationSettings],
                 step_keys: list[int]) -> list[int]:
    """The next token of logits rows ``rows`` [.., V], each under its own settings: greedy
    rows in one op read back at once (on a GPU one sync per step, not one per row); a
    sampling row with its own seed and step key."""
    greedy = [k for k, s in enumerate(settings) if s.temperature <= 0.0]
    index = [rows[k] for k in greedy]
    picked = logits if index == list(range(logits.shape[0])) else logits[index]
    best = dict(zip(greedy, policy.sample_tokens(picked).tolist())) if greedy else {}
    return [best[k] if k in best else
            int(policy.sample_next(logits[j:j + 1], s, torch.tensor([s.seed]), key)[0])
            for k, (j, s, key) in enumerate(zip(rows, settings, step_keys))]


class ContextSlots:
    """The context tower's caches for ``capacity`` rows on its executor's device."""

    def __init__(self, executor: ContextExecutor, config: TwoTowerConfig, capacity: int,
                 max_context: int, dtype: torch.dtype) -> None:
        self.executor = executor
        self.eos, self.pad = config.eos_token_id, config.pad_token_id
        self.pool = StepCache.allocate(config, capacity, max_context, dtype, executor.device)
        # per slot: the last token sampled (an AR row's next input, FROM_TOWER), the step
        # key its next sample must carry, and whether it stopped at EOS
        self.latest: list[Optional[int]] = [None] * capacity
        self.next_key = [0] * capacity
        self.stopped = [False] * capacity

    def empty(self, slot: int) -> None:
        _empty(self.pool, slot)
        self.latest[slot], self.next_key[slot], self.stopped[slot] = None, 0, False

    def extend(self, slots: list[int], ids: torch.Tensor, sample: list[Optional[Sample]]
               ) -> tuple[list[list[int]], list[list[TokenScore]], list[int]]:
        """One step of ids [R, T] over ``slots``, then one-token steps for the rows whose
        ``Sample`` chains, each fed its own last token (AR decoding without a round trip per
        token). A row whose id is ``FROM_TOWER`` pushes the token sampled for it last; one
        that stopped at EOS takes no step (the loop wrote it before it knew). Returns per row
        the tokens taken (sampled, or its target; none where it asks none or stopped), their
        scores where its settings ask for logprobs, and its length before the first step
        (where its delta starts). Rows step in slot order, so rows side by side in the pool
        are passed as a view of it rather than copied out and back."""
        ids, going = self._own_tokens(slots, ids, sample)
        going.sort(key=slots.__getitem__)
        if going == list(range(len(slots))):
            return self._extend(slots, ids, sample)
        tokens: list[list[int]] = [[] for _ in slots]
        scores: list[list[TokenScore]] = [[] for _ in slots]
        before = self.pool.lengths[slots].tolist()
        if going:
            taken = self._extend([slots[i] for i in going], ids[going],
                                 [sample[i] for i in going])
            for j, i in enumerate(going):
                tokens[i], scores[i], before[i] = taken[0][j], taken[1][j], taken[2][j]
        return tokens, scores, before

    def _own_tokens(self, slots: list[int], ids: torch.Tensor,
                    sample: list[Optional[Sample]]) -> tuple[torch.Tensor, list[int]]:
        """``ids`` with each FROM_TOWER replaced by its row's last sampled token, and the rows
        that step. A row's step key must be the one its last sample left: a call run out of
        the order it was written in is an error, never a wrong token."""
        own = (ids == FROM_TOWER).any(dim=1).tolist()
        if not any(own):
            return ids, list(range(len(slots)))
        if ids.shape[1] != 1:
            raise GenerationError("only one-token steps may push the tower's own token")
        ids, going = ids.clone(), []
        for i, slot in enumerate(slots):
            if not own[i]:
                going.append(i)
                continue
            s = sample[i]
            if self.latest[slot] is None or s is None or s.target is not None:
                raise GenerationError(f"row {i} pushes the token sampled for it last, but "
                                      "none was, or it samples none now")
            if self.stopped[slot]:  # written before the loop knew
                continue
            if s.step_key != self.next_key[slot]:
                raise GenerationError(f"row {i} asks for step {s.step_key} but its last "
                                      f"sample left step {self.next_key[slot]}: calls out of "
                                      "order")
            ids[i, 0] = self.latest[slot]
            going.append(i)
        return ids, going

    def _extend(self, slots: list[int], ids: torch.Tensor, sample: list[Optional[Sample]]
                ) -> tuple[list[list[int]], list[list[TokenScore]], list[int]]:
        """The steps of one call, over ``slots`` in ascending order. The batch stays as it is
        while the same rows chain on (``WriteBatch``: closed when the set changes and at the
        end), not rebuilt for every token."""
        before = self.pool.lengths[slots].tolist()
        batch = WriteBatch(self.pool, slots, self.pad)
        logits = batch.step(self.executor, ids)
        tokens: list[list[int]] = [[] for _ in slots]
        scores: list[list[TokenScore]] = [[] for _ in slots]
        rows = list(range(len(slots)))
        while True:
            self._take(logits, rows, sample, tokens, scores)
            going = [i for i in rows if self._chains(sample[i], tokens[i])]
            if going != rows:
                batch.close()
                if not going:
                    self._remember(slots, sample, tokens)
                    return tokens, scores, before
                rows = going
                batch = WriteBatch(self.pool, [slots[i] for i in going], self.pad)
            logits = batch.step(self.executor, torch.tensor([[tokens[i][-1]] for i in rows]))

    @staticmethod
    def _take(logits: torch.Tensor, rows: list[int], sample: list[Optional[Sample]],
              tokens: list[list[int]], scores: list[list[TokenScore]]) -> None:
        """Each row's next token from its logits (row j of ``logits`` is row rows[j])."""
        drawn = [j for j, i in enumerate(rows)
                 if sample[i] is not None and sample[i].target is None]
        drawn_tokens = dict(zip(drawn, _next_tokens(
            logits, drawn, [sample[rows[j]].settings for j in drawn],
            [sample[rows[j]].step_key + len(tokens[rows[j]]) for j in drawn])))
        for j, i in enumerate(rows):
            s = sample[i]
            if s is None:
                continue
            token = s.target if s.target is not None else drawn_tokens[j]
            tokens[i].append(token)
            if s.settings.logprobs is not None:
                scores[i].append(policy.score_token(logits[j], token, s.settings.logprobs))

    def _remember(self, slots: list[int], sample: list[Optional[Sample]],
                  tokens: list[list[int]]) -> None:
        """Each sampling row's last token, next step key and whether it stopped at EOS."""
        for slot, s, taken in zip(slots, sample, tokens):
            if s is None or s.target is not None or not taken:
                continue
            self.latest[slot], self.next_key[slot] = taken[-1], s.step_key + len(taken)
            self.stopped[slot] = self._stops_at(s, taken[-1])

    def _chains(self, sample: Optional[Sample], taken: list[int]) -> bool:
        """Whether a row takes another token in this call."""
        if sample is None or len(taken) >= sample.chain:
            return False
        return not self._stops_at(sample, taken[-1])

    def _stops_at(self, sample: Sample, token: int) -> bool:
        """Whether a row ends with ``token`` (EOS, where its settings stop there)."""
        return sample.settings.stop_at_eos and token == self.eos

    def delta(self, slot: int, old_length: int) -> np.ndarray:
        """What the denoiser's copy of ``slot`` needs since it held ``old_length``."""
        return pack_delta(self.pool, slot, old_length)


class DenoiserSlots:
    """The denoiser's copies of the context caches for ``capacity`` rows on its device, and
    the Mamba states one token back that mock-AR reads (spec §4.7)."""

    def __init__(self, executor: DenoiserExecutor, config: TwoTowerConfig, capacity: int,
                 max_context: int, dtype: torch.dtype, fused_unmask: bool = False) -> None:
        self.executor, self.config = executor, config
        self.fused_unmask = fused_unmask and hasattr(executor, "denoiser_unmask_step")
        self.pool = StepCache.allocate(config, capacity, max_context, dtype, executor.device)
        self.previous = {n: torch.zeros_like(self.pool.tensors[n])
                         for n in self.pool.mamba_names()}
        # per slot, after its last diffusion step: the block ids, that step's key and steps
        # left, and whether the block resolved (so a step written ahead continues from here)
        self.last: dict[int, tuple[torch.Tensor, int, int, bool]] = {}

    def empty(self, slot: int) -> None:
        _empty(self.pool, slot)
        self.last.pop(slot, None)

    def keep_previous(self, slot: int) -> None:
        """Keep the copy's Mamba states before a one-token delta: the "S−2" view."""
        for name, kept in self.previous.items():
            kept[slot] = self.pool.tensors[name][slot]

    def apply(self, slot: int, delta: np.ndarray) -> None:
        apply_delta(self.pool, slot, delta)

    def copy_from(self, source: StepCache, slot: int, old_length: int) -> int:
        """The delta without packing it, from a context pool in this process (any device);
        returns the bytes moved."""
        new_length, moved = int(source.lengths[slot]), 0
        for name in source.kv_names():
            piece = source.tensors[name][slot, :, old_length:new_length]
            self.pool.tensors[name][slot, :, old_length:new_length] = piece.to(self.pool.device)
            moved += piece.numel() * piece.element_size()
        for name in source.mamba_names():
            piece = source.tensors[name][slot]
            self.pool.tensors[name][slot] = piece.to(self.pool.device)
            moved += piece.numel() * piece.element_size()
        self.pool.lengths[slot] = new_length
        return moved

    def fused(self, settings: GenerationSettings) -> bool:
        """Greedy steps without forced commits run the fused unmask op when there is one."""
        return self.fused_unmask and settings.temperature <= 0.0 \
            and settings.forced_commits is None

    def denoise(self, slots: list[int], blocks: torch.Tensor,
                settings: list[GenerationSettings], step_keys: list[int],
                steps_left: list[int]) -> torch.Tensor:
        """One diffusion step of blocks [R, S]: the next block ids [R, S]. Rows the fused op
        can serve take it together; the others get logits and the policy.

        A row whose block ids are ``FROM_TOWER`` continues the block its last step here left
        (with the next step key and one step fewer): the loop wrote the step before it had
        the last one's answer. If that block resolved, the row takes no step and gets
        ``FROM_TOWER`` back."""
        blocks, step_keys, steps_left, going = self._own_blocks(slots, blocks, step_keys,
                                                                steps_left)
        nxt = torch.full_like(blocks, FROM_TOWER)
        fused = [i for i in going if self.fused(settings[i])]
        plain = [i for i in going if not self.fused(settings[i])]
        for rows, step in ((fused, self._fused_step), (plain, self._policy_step)):
            rows.sort(key=slots.__getitem__)  # side by side in the pool: a view, not a copy
            if rows:
                nxt[rows] = step([slots[i] for i in rows], blocks[rows],
                                 [settings[i] for i in rows], [step_keys[i] for i in rows],
                                 [steps_left[i] for i in rows])
        masked = (nxt[going] == self.config.mask_token_id).any(dim=1).tolist()
        for i, masks_left in zip(going, masked):
            self.last[slots[i]] = (nxt[i].clone(), step_keys[i], steps_left[i],
                                   policy.block_resolved(masks_left, steps_left[i]))
        return nxt

    def _own_blocks(self, slots: list[int], blocks: torch.Tensor, step_keys: list[int],
                    steps_left: list[int]
                    ) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
        """The inputs with each ``FROM_TOWER`` row's block, key and steps left taken from its
        last step, and the rows that step (not those whose block resolved)."""
        own = (blocks[:, 0] == FROM_TOWER).tolist()
        if not any(own):
            return blocks, step_keys, steps_left, list(range(len(slots)))
        blocks, step_keys, steps_left = blocks.clone(), list(step_keys), list(steps_left)
        going = []
        for i, slot in enumerate(slots):
            if own[i]:
                if slot not in self.last:
                    raise GenerationError("a row continued a block the denoiser never "
                                          "stepped")
                block, key, left, resolved = self.last[slot]
                if resolved:
                    continue
                blocks[i], step_keys[i], steps_left[i] = block, key + 1, left - 1
            going.append(i)
        return blocks, step_keys, steps_left, going

    def _inputs(self, slots: list[int], blocks: torch.Tensor
                ) -> tuple[torch.Tensor, StepCache]:
        t = (blocks == self.config.mask_token_id).float().mean(-1)
        return t, gather(self.pool, slots)

    def _fused_step(self, slots, blocks, settings, step_keys, steps_left) -> torch.Tensor:
        t, cache = self._inputs(slots, blocks)
        gamma = torch.tensor([s.confidence_threshold for s in settings])
        nxt, _, _ = self.executor.denoiser_unmask_step(blocks, t, cache, gamma,
                                                       torch.tensor(steps_left))
        return nxt.to(blocks.device)

    def _policy_step(self, slots, blocks, settings, step_keys, steps_left) -> torch.Tensor:
        t, cache = self._inputs(slots, blocks)
        logits = self.executor.denoiser_step(blocks, t, cache)
        pred, conf = self._predictions(logits, settings, step_keys)
        mask_id = self.config.mask_token_id
        return torch.cat([policy.commit_step(blocks[i:i + 1], pred[i:i + 1], conf[i:i + 1],
                                             mask_id, s.confidence_threshold, steps_left[i],
                                             s.forced_commits)[0]
                          for i, s in enumerate(settings)])

    def _predictions(self, logits: torch.Tensor, settings: list[GenerationSettings],
                     step_keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's predicted ids and confidences [R, S], computed where the logits are and
        brought to the host (a few bytes per position, not V logits): greedy rows in one
        batch, a sampling row with its own temperature, seed and step key."""
        mask_id = self.config.mask_token_id
        pred = torch.empty(logits.shape[:2], dtype=torch.long)
        conf = torch.empty(logits.shape[:2], dtype=torch.float32)
        greedy = [i for i, s in enumerate(settings) if s.temperature <= 0.0]
        if greedy:
            rows = logits if len(greedy) == len(settings) else logits[greedy]
            p, c = policy.diffusion_predictions(rows, mask_id)
            pred[greedy], conf[greedy] = p.cpu(), c.float().cpu()
        for i, s in enumerate(settings):
            if s.temperature > 0.0:
                p, c = policy.diffusion_predictions(logits[i:i + 1], mask_id, s.temperature,
                                                    torch.tensor([s.seed]), step_keys[i])
                pred[i], conf[i] = p[0].cpu(), c[0].float().cpu()
        return pred, conf

    def mock_ar(self, slots: list[int], latest: list[int], settings: list[GenerationSettings],
                step_keys: list[int]) -> list[int]:
        """Mock-AR's next tokens from each row's latest token over its copy one token back."""
        view = gather(self.pool, slots).one_token_back(
            {n: gather_tensor(t, slots) for n, t in self.previous.items()})
        logits = self.executor.mock_ar_step(torch.tensor([[t] for t in latest]), view)
        return _next_tokens(logits, list(range(len(settings))), settings, step_keys)
