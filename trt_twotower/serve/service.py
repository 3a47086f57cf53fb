"""What the ``twotower_bls`` Triton model does, kept in the package so it is tested and the
model file stays thin: validate a request's inputs into ``GenerationSettings`` and run it on a
``TwoTowerSession`` with streaming and cancellation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..policy import MODES, GenerationError, GenerationSettings
from ..runtime.session import Request, RequestResult, TwoTowerSession

DEFAULTS = {"mode": "diffusion", "block_size": 16, "steps_per_block": 16,
            "confidence_threshold": 0.8, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "seed": 0, "stream": False}


class RequestError(ValueError):
    """An input a client sent that cannot be served; the message goes back to the client."""


@dataclass
class ServiceLimits:
    max_context: int
    max_tokens: int
    block_sizes: tuple[int, ...]


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
            confidence_threshold=float(v["confidence_threshold"]),
            temperature=float(v["temperature"]), top_k=int(v["top_k"]) or None,
            top_p=float(v["top_p"]) if float(v["top_p"]) < 1.0 else None, seed=int(v["seed"]))
    except GenerationError as err:
        raise RequestError(str(err)) from err


def stats_json(result: RequestResult) -> bytes:
    s = result.stats
    return json.dumps({"denoiser_evaluations": s.denoiser_evals,
                       "tokens_per_evaluation": (len(result.tokens) / s.denoiser_evals
                                                 if s.denoiser_evals else None),
                       "context_steps": s.context_steps, "handoff_bytes": s.handoff_bytes,
                       "seconds": round(s.seconds, 4), "cancelled": result.cancelled}).encode()


def open_session(source: str, backend: str, device: str, max_context: int) -> TwoTowerSession:
    """The session a server process hosts: ``builtin``, ``preset:NAME`` or a directory."""
    from ..reference.sources import open_source
    from ..runtime import backends

    if backend == "onnxruntime":
        opened = backends.open_onnxruntime(Path(source))
    else:
        model_source = (open_source(None, source.split(":", 1)[1], None, device)
                        if source.startswith("preset:") else
                        open_source(None if source == "builtin" else Path(source), None, None,
                                    device))
        opened = backends.open_torch(model_source, max_context)
    return TwoTowerSession(opened.context, opened.denoiser, opened.config, max_context,
                           opened.dtype, fused_unmask=opened.fused_unmask)


def run(session: TwoTowerSession, prompt_ids: np.ndarray, settings: GenerationSettings,
        on_block: Optional[Callable[[list[int]], Optional[bool]]]) -> RequestResult:
    return session.generate([Request([int(i) for i in prompt_ids], settings, on_block)])[0]
