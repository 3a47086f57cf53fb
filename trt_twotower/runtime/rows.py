"""A request as the step loop sees it: what it asks (``Request``), what it gets back
(``RequestResult`` with its ``RequestStats``), and, once admitted, its ``Row`` — its slot in
both towers' pools and where it is in its generation (its phase, block, step keys and AR
budget). The loop (``scheduler.py``) moves rows through their phases; decoding rules come from
``trt_twotower.policy``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import policy
from ..policy import GenerationSettings, TokenScore
from .tower_work import Ref, Sample

# A streaming callback gets each committed block's ids (a token at a time in AR modes);
# returning False cancels the request.
OnDelta = Callable[[list[int]], Optional[bool]]

PREFILL, DENOISE, SAMPLE, FINISHED = "prefill", "denoise", "sample", "finished"


@dataclass
class RequestStats:
    denoiser_evals: int = 0
    context_steps: int = 0
    handoff_bytes: int = 0
    boundary_bytes: int = 0          # its share of what the tower calls moved between processes
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
    logprobs: list[TokenScore] = field(default_factory=list)         # one per kept token
    prompt_logprobs: list[TokenScore] = field(default_factory=list)  # echo: prompt[1:]

    @property
    def tokens_per_eval(self) -> float:
        evals = self.stats.denoiser_evals
        return len(self.tokens) / evals if evals else float("nan")


@dataclass
class Request:
    """One generation. Its ``result`` starts afresh each time it is queued and fills in as
    it runs, so a streaming callback can read there the scores of the ids it is given."""
    prompt_ids: list[int]
    settings: GenerationSettings
    on_delta: Optional[OnDelta] = None
    result: RequestResult = field(default_factory=RequestResult)


class Row:
    """One admitted request: its slot in both pools and where it is in its generation."""

    def __init__(self, request: Request, mask_id: int) -> None:
        self.request = request
        self.ref: Optional[Ref] = None
        self.settings = request.settings
        self.result = request.result = RequestResult()
        self.phase = PREFILL
        prompt = request.prompt_ids
        self.mock = self.settings.mode == "mock-ar"
        # mock-AR keeps its last prompt token back: it is the first "latest" token (§5.2)
        self.pending = list(prompt[:-1] if self.mock else prompt)
        self.latest = prompt[-1]
        self.block = torch.full((self.settings.block_size,), mask_id, dtype=torch.long)
        self.block_index = self.step_in_block = self.step = 0
        self.commit: Optional[torch.Tensor] = None    # a resolved block to push next
        self.token: Optional[int] = None              # a token to push next (AR rows:
        #                                               FROM_TOWER, the one sampled there)
        self.requested = 0                            # AR: tokens asked of the context tower
        self.sampled: list[int] = []                  # AR: the context tower's next tokens
        self.sampled_scores: list[TokenScore] = []
        self.cancel_requested = False
        self.on_denoiser = False                      # opened in the denoiser's pool
        self.written_block: Optional[int] = None      # block index of its last denoiser step

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

    @property
    def scores_prompt(self) -> bool:
        """Echo with logprobs: each prompt token after the first is scored."""
        return self.settings.echo and self.settings.logprobs is not None

    def claim_sample(self, chain: int = 1) -> Optional[Sample]:
        """AR rows ask the context tower for their next token with each step (up to
        ``chain`` of them, never past their budget); the step keys are claimed as the call
        is written, so the next call can be written before this one's answer is back."""
        if self.settings.mode != "ar":
            return None
        count = max(1, min(chain, self.settings.max_new_tokens - self.requested))
        sample = Sample(self.settings, self.step, chain=count)
        self.step, self.requested = self.step + count, self.requested + count
        return sample

    @property
    def wants_token(self) -> bool:
        """A token to push, and (AR) tokens still to ask for: an AR row whose last tokens
        are under way waits for them."""
        return self.token is not None and (
            self.settings.mode != "ar" or self.requested < self.settings.max_new_tokens)

    def charge(self, phase: str, seconds: float) -> None:
        stats = self.result.stats
        setattr(stats, phase, getattr(stats, phase) + seconds)

    def emit(self, ids: list[int], eos: int, scores: list[TokenScore] = ()) -> None:
        """Keep ids (within budget, through EOS), stream them, finish on EOS, budget or a
        cancelling callback. ``scores``: the AR tokens' own, kept with them."""
        result = self.result
        ids, done = policy.accept_tokens(len(result.tokens), ids, self.settings, eos)
        result.tokens.extend(ids)
        result.logprobs.extend(scores[:len(ids)])
        on_delta = self.request.on_delta
        if on_delta is not None and ids and on_delta(ids) is False:
            result.cancelled = done = True
        if done:
            self.phase = FINISHED
