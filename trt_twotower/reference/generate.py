"""The three generation modes over the reference model (spec §5), using the one decoding policy.

Departures from the original code, each deliberate: a 1-token prompt works; the context cache
is not extended after the last block or token; each row stops at its own EOS and its output
ends with that EOS (the original stops every row and returns the rest of the final block);
the timestep is each row's own masked fraction (see ``policy``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import policy
from ..policy import GenerationSettings
from .model import TwoTowerModel


@dataclass
class GenerationResult:
    """Generated ids per row (prompt excluded) and what they cost."""

    tokens: list[list[int]]
    denoiser_evals: list[int]
    context_steps: int = 0
    seconds: float = 0.0
    committed_per_eval: list[list[int]] = field(default_factory=list)

    def tokens_per_eval(self, row: int = 0) -> float:
        evals = self.denoiser_evals[row]
        return len(self.tokens[row]) / evals if evals else float("nan")


@torch.no_grad()
def generate(model: TwoTowerModel, prompt_ids: torch.Tensor, settings: GenerationSettings,
             eos_token_id: Optional[int] = None, seeds: Optional[Sequence[int]] = None
             ) -> GenerationResult:
    """prompt_ids [B, P] (P ≥ 1, equal lengths) → generated tokens in ``settings.mode``."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise policy.GenerationError(
            f"prompt_ids must have shape [batch, length >= 1], got {tuple(prompt_ids.shape)}")
    vocab = model.config.vocab_size
    if int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= vocab:
        raise policy.GenerationError(f"prompt ids must lie in [0, {vocab})")
    prompt_ids = prompt_ids.to(model.device)
    batch = prompt_ids.shape[0]
    seed_tensor = torch.tensor(list(seeds) if seeds is not None else [settings.seed] * batch,
                               dtype=torch.int64, device=model.device)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    start = time.perf_counter()
    runner = {"diffusion": _diffusion, "mock-ar": _mock_ar, "ar": _ar}[settings.mode]
    result = runner(model, prompt_ids, settings, eos, seed_tensor)
    if settings.stop_at_eos:
        result.tokens = [_through_first(row, eos) for row in result.tokens]
    result.seconds = time.perf_counter() - start
    return result


def _through_first(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def _diffusion(model: TwoTowerModel, prompt: torch.Tensor, s: GenerationSettings, eos: int,
               seeds: torch.Tensor) -> GenerationResult:
    batch, mask_id = prompt.shape[0], model.config.mask_token_id
    cache = model.new_cache(batch)
    model.context_step(prompt, cache)
    result = GenerationResult(tokens=[[] for _ in range(batch)], denoiser_evals=[0] * batch,
                              context_steps=1)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    n_blocks = s.max_new_tokens // s.block_size
    for b in range(n_blocks):
        block = torch.full((batch, s.block_size), mask_id, dtype=torch.long, device=prompt.device)
        for step in range(s.steps_per_block):
            masked = block == mask_id
            active = masked.any(-1)
            if not active.any():
                break
            t = masked.float().mean(-1)
            logits = model.denoiser_step(block, t, cache)
            pred, conf = policy.diffusion_predictions(
                logits, mask_id, s.temperature, seeds, step_key=b * s.steps_per_block + step)
            new_block, _ = policy.commit_step(block, pred, conf, mask_id, s.confidence_threshold,
                                              s.steps_per_block - step, s.forced_commits)
            result.committed_per_eval.append(((new_block != block).sum(-1)).tolist())
            for row in torch.nonzero(active).flatten().tolist():
                result.denoiser_evals[row] += 1
            block = new_block
        for row in range(batch):
            if not finished[row]:
                result.tokens[row].extend(block[row].tolist())
        finished |= (block == eos).any(-1) & s.stop_at_eos
        if finished.all() or b == n_blocks - 1:
            break
        model.context_step(block, cache)
        result.context_steps += 1
    return result


def _ar(model: TwoTowerModel, prompt: torch.Tensor, s: GenerationSettings, eos: int,
        seeds: torch.Tensor) -> GenerationResult:
    batch = prompt.shape[0]
    cache = model.new_cache(batch)
    logits = model.context_step(prompt, cache)
    result = GenerationResult(tokens=[[] for _ in range(batch)], denoiser_evals=[0] * batch,
                              context_steps=1)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for i in range(s.max_new_tokens):
        token = policy.sample_tokens(logits, s.temperature, s.top_k, s.top_p, seeds, step_key=i)
        _append(result, token, finished)
        finished |= (token == eos) & s.stop_at_eos
        if finished.all() or i == s.max_new_tokens - 1:
            break
        logits = model.context_step(token[:, None], cache)
        result.context_steps += 1
    return result


def _mock_ar(model: TwoTowerModel, prompt: torch.Tensor, s: GenerationSettings, eos: int,
             seeds: torch.Tensor) -> GenerationResult:
    batch = prompt.shape[0]
    cache = model.new_cache(batch)
    result = GenerationResult(tokens=[[] for _ in range(batch)], denoiser_evals=[0] * batch)
    if prompt.shape[1] > 1:
        model.context_step(prompt[:, :-1], cache)
        result.context_steps += 1
    s2 = cache.mamba_states()
    model.context_step(prompt[:, -1:], cache)
    result.context_steps += 1
    latest = prompt[:, -1:]
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for i in range(s.max_new_tokens):
        logits = model.mock_ar_step(latest, cache.one_token_back(*s2))
        for row in range(batch):
            result.denoiser_evals[row] += int(not finished[row])
        token = policy.sample_tokens(logits, s.temperature, s.top_k, s.top_p, seeds, step_key=i)
        _append(result, token, finished)
        finished |= (token == eos) & s.stop_at_eos
        if finished.all() or i == s.max_new_tokens - 1:
            break
        s2 = cache.mamba_states()
        model.context_step(token[:, None], cache)
        result.context_steps += 1
        latest = token[:, None]
    return result


def _append(result: GenerationResult, token: torch.Tensor, finished: torch.Tensor) -> None:
    for row, value in enumerate(token.tolist()):
        if not finished[row]:
            result.tokens[row].append(value)
