"""What the ``twotower_bls`` Triton model checks, kept in the package so it is tested and the
model file stays thin: a request's inputs validated into ``GenerationSettings`` (each problem
a clear error for the client), and the stats it answers with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from ..policy import MODES, GenerationError, GenerationSettings
from ..runtime.session import RequestResult

_SETTINGS = GenerationSettings()
DEFAULTS = {"mode": _SETTINGS.mode, "block_size": _SETTINGS.block_size,
            "steps_per_block": _SETTINGS.steps_per_block,
            "confidence_threshold": _SETTINGS.confidence_threshold,
            "temperature": _SETTINGS.temperature, "top_k": 0, "top_p": 1.0,
            "seed": _SETTINGS.seed, "stream": False, "forced_commits": 0,
            "ignore_eos": not _SETTINGS.stop_at_eos, "logprobs": -1, "echo": False}


def _real(value: Any) -> float:
    """A float input as the client wrote it: FP32 on the wire turns 0.9 into 0.8999999762,
    which would decide a confidence comparison differently from an in-process 0.9."""
    return round(float(value), 6)


class RequestError(ValueError):
    """An input a client sent that cannot be served; the message goes back to the client."""


@dataclass
class ServiceLimits:
    max_context: int
    max_tokens: int
    block_sizes: tuple[int, ...]


def prompt_byte_limit(vocabulary: Iterable[str], max_context: int) -> int:
    """The most bytes a prompt that fits ``max_context`` tokens can have: no token spells more
    bytes than the longest entry of the vocabulary (whose UTF-8 form counts a byte-level or
    byte-fallback token's bytes high, so the bound never refuses a prompt that fits)."""
    return max_context * max(len(token.encode()) for token in vocabulary)


def check_prompt_bytes(size: int, limit: int) -> None:
    """Refuse a prompt by its byte length before tokenizing it: tokenizing megabytes only to
    refuse them would hold up every request queued behind it."""
    if size > limit:
        raise RequestError(f"text_input is {size} bytes, more than the {limit} bytes any "
                           "prompt that fits the maximum context can have: send a shorter "
                           "prompt")


def settings_from_inputs(values: dict[str, Any], prompt_length: int, limits: ServiceLimits
                         ) -> GenerationSettings:
    """Validate one request's scalar inputs (numpy scalars or None when not sent)."""
    v = {k: (values.get(k) if values.get(k) is not None else DEFAULTS.get(k)) for k in
         (*DEFAULTS, "max_tokens")}
    if prompt_length == 0:
        raise RequestError("text_input is empty: send a prompt")
    if v["max_tokens"] is None:
        raise RequestError("missing required input max_tokens")
    max_tokens = int(v["max_tokens"])
    if not 0 < max_tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must lie in [1, {limits.max_tokens}], got {max_tokens}")
    if prompt_length + max_tokens > limits.max_context:
        raise RequestError(f"prompt ({prompt_length} tokens) + max_tokens ({max_tokens}) "
                           f"exceeds the maximum context of {limits.max_context}")
    mode = v["mode"].decode() if isinstance(v["mode"], bytes) else str(v["mode"])
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    block = int(v["block_size"])
    if mode == "diffusion" and block not in limits.block_sizes:
        raise RequestError(f"block_size {block} is not one this repository serves "
                           f"({', '.join(map(str, limits.block_sizes))})")
    try:
        return GenerationSettings(
            mode=mode, max_new_tokens=max_tokens, block_size=block,
            steps_per_block=int(v["steps_per_block"]),
            confidence_threshold=_real(v["confidence_threshold"]),
            temperature=_real(v["temperature"]), top_k=int(v["top_k"]) or None,
            top_p=_real(v["top_p"]) if _real(v["top_p"]) < 1.0 else None, seed=int(v["seed"]),
            forced_commits=int(v["forced_commits"]) or None,
            stop_at_eos=not bool(v["ignore_eos"]),
            logprobs=None if int(v["logprobs"]) < 0 else int(v["logprobs"]),
            echo=bool(v["echo"]))
    except GenerationError as err:
        raise RequestError(str(err)) from err


def stats_json(result: RequestResult) -> bytes:
    """The ``stats`` output: what the request cost, including its share of the bytes the
    tower calls moved across process boundaries when it was served by the tower models."""
    s = result.stats
    return json.dumps({"denoiser_evaluations": s.denoiser_evals,
                       "tokens_per_evaluation": (len(result.tokens) / s.denoiser_evals
                                                 if s.denoiser_evals else None),
                       "context_steps": s.context_steps, "handoff_bytes": s.handoff_bytes,
                       "boundary_bytes": s.boundary_bytes,
                       "seconds": round(s.seconds, 4), "cancelled": result.cancelled}).encode()
