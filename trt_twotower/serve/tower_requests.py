"""The tower models' request protocol: named numpy inputs in, named numpy outputs out. The
Triton model files only convert tensors; the BLS link (``bls_link.py``) speaks the other end.

Every request names an ``op``. All but ``stats`` carry the server's tower secret, so only
the orchestrator (which alone knows it) can change a tower; ``stats`` shows counts only, no
ids. Every op on a sequence names its ``sequence_id`` (uint64) and the ``owner`` token given at
``open``. Settings travel as one JSON string and are validated again on arrival.
"""

from __future__ import annotations

import json
import secrets
from typing import Optional, Union

import numpy as np

from .towers import (ContextTower, DenoiserTower, SequenceKey, TowerRequestError,
                     settings_from_json)

CONTEXT_OPS = ("open", "extend", "extend_and_sample", "release", "stats")
DENOISER_OPS = ("open", "append", "step", "mock_ar", "release", "stats")
Inputs = dict[str, Optional[np.ndarray]]


class TowerAccessDenied(TowerRequestError):
    """A request without the server's tower secret: tower models answer the orchestrator
    only."""


def _text(value: np.ndarray) -> str:
    item = value.reshape(-1)[0]
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def _need(inputs: Inputs, name: str, op: str) -> np.ndarray:
    if inputs.get(name) is None or inputs[name].size == 0:
        raise TowerRequestError(f"op {op!r} needs the input {name}")
    return inputs[name]


def _authorize(inputs: Inputs, secret: str) -> None:
    """Constant-time, so response times say nothing about the secret."""
    given = inputs.get("tower_secret")
    if given is None or given.size == 0 or not secrets.compare_digest(
            _text(given).encode(), secret.encode()):
        raise TowerAccessDenied("tower models answer the orchestrator only: send requests to "
                                "the ensemble model")


def _sequence(inputs: Inputs, op: str) -> SequenceKey:
    return SequenceKey(int(_need(inputs, "sequence_id", op).reshape(-1)[0]),
                       _text(_need(inputs, "owner", op)))


def handle(tower: Union[ContextTower, DenoiserTower], inputs: Inputs, secret: str
           ) -> dict[str, np.ndarray]:
    """Run one request on ``tower``; returns the outputs of its op."""
    op = _text(_need(inputs, "op", "any"))
    ops = CONTEXT_OPS if isinstance(tower, ContextTower) else DENOISER_OPS
    if op not in ops:
        raise TowerRequestError(f"unknown op {op!r}; this tower serves {', '.join(ops)}")
    if op == "stats":
        return {"stats": np.array([json.dumps(tower.stats()).encode()], dtype=np.object_)}
    _authorize(inputs, secret)
    sequence = _sequence(inputs, op)
    if op == "open":
        tower.open(sequence)
        return {"opened": np.array([True], dtype=bool)}
    if op == "release":
        return {"released": np.array([tower.release(sequence)], dtype=bool)}
    if op == "append":
        delta = _need(inputs, "cache_delta", op).reshape(-1)
        keep = inputs.get("keep_previous")
        tower.append(sequence, delta, bool(keep.reshape(-1)[0]) if keep is not None else False)
        return {"length": np.array([int(tower.sequences.require(sequence).lengths[0])], np.int64)}
    if op == "extend":
        ids = _need(inputs, "input_ids", op).reshape(-1).tolist()
        return {"cache_delta": tower.extend(sequence, ids)}
    settings = settings_from_json(_text(_need(inputs, "settings", op)))
    step_key = int(_need(inputs, "step_key", op).reshape(-1)[0])
    if op == "extend_and_sample":
        ids = _need(inputs, "input_ids", op).reshape(-1).tolist()
        token = tower.extend_and_sample(sequence, ids, settings, step_key)
        return {"token": np.array([token], dtype=np.int64)}
    if op == "step":
        block = _need(inputs, "input_ids", op).reshape(-1).tolist()
        return {"block_ids": np.array(tower.denoise(sequence, block, settings, step_key),
                                      dtype=np.int64)}
    token = int(_need(inputs, "input_ids", op).reshape(-1)[0])
    return {"token": np.array([tower.mock_ar(sequence, token, settings, step_key)],
                              dtype=np.int64)}
