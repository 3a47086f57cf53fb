"""The tower models' request protocol: named numpy inputs in, named numpy outputs out. The
Triton model files only convert tensors; the BLS link (``bls_link.py``) speaks the other end.

Every request names an ``op``; all but ``stats`` name a ``sequence_id`` (uint64). Settings
travel as one JSON string and are validated again on arrival.
"""

from __future__ import annotations

import json
from typing import Optional, Union

import numpy as np

from .towers import ContextTower, DenoiserTower, settings_from_json

CONTEXT_OPS = ("extend", "extend_and_sample", "release", "stats")
DENOISER_OPS = ("append", "step", "mock_ar", "release", "stats")


class TowerRequestError(ValueError):
    """A tower request that names an unknown op or lacks what its op needs."""


def _text(value: np.ndarray) -> str:
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else str(item)


def _need(inputs: dict[str, np.ndarray], name: str, op: str) -> np.ndarray:
    if inputs.get(name) is None:
        raise TowerRequestError(f"op {op!r} needs the input {name}")
    return inputs[name]


def handle(tower: Union[ContextTower, DenoiserTower], inputs: dict[str, Optional[np.ndarray]]
           ) -> dict[str, np.ndarray]:
    """Run one request on ``tower``; returns the outputs of its op."""
    op = _text(_need(inputs, "op", "any"))
    ops = CONTEXT_OPS if isinstance(tower, ContextTower) else DENOISER_OPS
    if op not in ops:
        raise TowerRequestError(f"unknown op {op!r}; this tower serves {', '.join(ops)}")
    if op == "stats":
        return {"stats": np.array([json.dumps(tower.stats()).encode()], dtype=np.object_)}
    sequence = int(_need(inputs, "sequence_id", op).reshape(-1)[0])
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
