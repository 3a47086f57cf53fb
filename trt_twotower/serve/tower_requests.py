"""The tower models' request protocol: a round's work (``runtime.tower_work``) as named numpy
tensors and back. The orchestrator encodes (``encode_*``), a tower model decodes and answers
(``handle``); the Triton model files only convert tensors.

Every request names an ``op``: ``round`` (one scheduler round's work for this tower) or
``stats`` (counts only). A round needs the server's tower secret, so only the orchestrator
(which alone knows it) can change a tower; its ``call_order`` (caller id, index) makes calls
run in the order the caller started them (``towers.CallOrder``). Sequences travel as
``*_id`` (uint64) and ``*_owner`` (the token given at open) pairs; settings as JSON strings,
validated again on arrival; groups of rows as their sizes and widths with their ids
flattened; cache deltas as one bytes element per row; a token's score as JSON.
Absent inputs are empty lists.
"""

from __future__ import annotations

import gc
import json
import secrets
from typing import Optional, Union

import numpy as np
import torch

from ..runtime.cache_delta import HEADER_BYTES
from ..policy import TokenScore
from ..runtime.tower_work import (FROM_TOWER, ContextResult, ContextWork, Delta, DenoiseGroup,
                                  DenoiserResult, DenoiserWork, ExtendGroup, MockGroup, Sample)
from .towers import (ContextTower, DenoiserTower, SequenceKey, TowerRequestError,
                     settings_from_json, settings_to_json)

OPS = ("round", "stats")
Inputs = dict[str, Optional[np.ndarray]]
NO_TOKEN = -1


class TowerAccessDenied(TowerRequestError):
    """A request without the server's tower secret: tower models answer the orchestrator
    only."""


# --- tensors -------------------------------------------------------------------------------
def _texts(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def _ints(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _keys(prefix: str, keys: list[SequenceKey]) -> dict[str, np.ndarray]:
    if not keys:
        return {}
    return {f"{prefix}_id": np.array([k.id for k in keys], dtype=np.uint64),
            f"{prefix}_owner": _texts([k.owner for k in keys])}


def _text(item: object) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise TowerRequestError("text inputs must be UTF-8") from None
    return str(item)


def _get(inputs: Inputs, name: str) -> np.ndarray:
    value = inputs.get(name)
    return np.zeros(0) if value is None else value.reshape(-1)


def _read_keys(inputs: Inputs, prefix: str) -> list[SequenceKey]:
    ids, owners = _get(inputs, f"{prefix}_id"), _get(inputs, f"{prefix}_owner")
    if ids.size != owners.size:
        raise TowerRequestError(f"{prefix}_id and {prefix}_owner differ in length "
                                f"({ids.size} and {owners.size})")
    return [SequenceKey(int(i), _text(o)) for i, o in zip(ids, owners)]


def _need_length(name: str, value: np.ndarray, length: int) -> None:
    if value.size != length:
        raise TowerRequestError(f"{name} has {value.size} values, expected {length}")


def _groups(inputs: Inputs, rows: int) -> list[tuple[slice, torch.Tensor]]:
    """Rows per group and ids [R, T] per group, checked against each other."""
    sizes, widths = _get(inputs, "group_rows"), _get(inputs, "group_width")
    ids = _get(inputs, "input_ids")
    _need_length("group_width", widths, sizes.size)
    if sizes.size and (sizes.min() < 1 or widths.min() < 1):
        raise TowerRequestError("groups need at least one row and one id per row")
    _need_length("the rows named", np.zeros(rows), int(sizes.sum()))
    _need_length("input_ids", ids, int((sizes * widths).sum()))
    out, row, offset = [], 0, 0
    for size, width in zip(sizes.tolist(), widths.tolist()):
        count = size * width
        out.append((slice(row, row + size),
                    torch.from_numpy(ids[offset:offset + count].astype(np.int64)
                                     ).reshape(size, width)))
        row, offset = row + size, offset + count
    return out


def _settings(values: np.ndarray) -> list:
    return [settings_from_json(_text(v)) for v in values]


def _authorize(inputs: Inputs, secret: str) -> None:
    """Constant-time, so response times say nothing about the secret."""
    given = inputs.get("tower_secret")
    if given is None or given.size == 0 or not secrets.compare_digest(
            _text(given.reshape(-1)[0]).encode("utf-8", "replace"), secret.encode()):
        raise TowerAccessDenied("tower models answer the orchestrator only: send requests to "
                                "the ensemble model")


# --- the orchestrator's side ---------------------------------------------------------------
def _encode_groups(rows: list[list[SequenceKey]], ids: list[torch.Tensor]
                   ) -> dict[str, np.ndarray]:
    """Groups of rows, each with its ids [R, T], as the keys, sizes, widths and flat ids that
    ``_groups`` reads back."""
    return {**_keys("row", [k for group in rows for k in group]),
            "group_rows": _ints([len(group) for group in rows]),
            "group_width": _ints([t.shape[1] for t in ids]),
            "input_ids": torch.cat([t.reshape(-1) for t in ids]).numpy().astype(np.int64)}


def encode_context(work: ContextWork, secret: str) -> dict[str, np.ndarray]:
    sample = [s for g in work.groups for s in g.sample]
    inputs = {"op": _texts(["round"]), "tower_secret": _texts([secret]),
              **_keys("open", work.opened), **_keys("release", work.released)}
    if work.groups:
        inputs.update(
            **_encode_groups([g.rows for g in work.groups], [g.ids for g in work.groups]),
            mirror=np.array([m for g in work.groups for m in g.mirror], dtype=bool),
            sample=_texts(["" if s is None else settings_to_json(s.settings) for s in sample]),
            step_key=_ints([0 if s is None else s.step_key for s in sample]),
            target=_ints([NO_TOKEN if s is None or s.target is None else s.target
                          for s in sample]),
            chain=_ints([1 if s is None else s.chain for s in sample]))
    return inputs


def _score_json(score: Optional[TokenScore]) -> bytes:
    if score is None:
        return b""
    return json.dumps([score.token, score.logprob, score.top]).encode()


def _score(text: bytes) -> Optional[TokenScore]:
    if not text:
        return None
    token, logprob, top = json.loads(text)
    return TokenScore(int(token), float(logprob), tuple((int(i), float(v)) for i, v in top))


def decode_context_result(work: ContextWork, outputs: dict[str, np.ndarray]) -> ContextResult:
    """Each row's tokens (``token_count`` of them, in row order in ``token``) and their
    scores (one ``score`` per token, empty where none was asked)."""
    tokens = outputs["token"].reshape(-1).tolist() if work.groups else []
    counts = outputs["token_count"].reshape(-1).tolist() if work.groups else []
    deltas = outputs["cache_delta"].reshape(-1) if work.groups else []
    scores = outputs["score"].reshape(-1).tolist() if work.groups else []
    rows = sum(len(g.rows) for g in work.groups)
    if len(counts) != rows or sum(counts) != len(tokens) or len(scores) != len(tokens):
        raise TowerRequestError(f"the context tower sent {len(tokens)} tokens, {len(scores)} "
                                f"scores and {len(counts)} counts for {rows} rows")
    per_group, per_group_scores, at, row, mirrored, keep = [], [], 0, 0, [], []
    for g in work.groups:
        taken, scored = [], []
        for count in counts[row:row + len(g.rows)]:
            taken.append([int(t) for t in tokens[at:at + count]])
            scored.append([x for x in map(_score, scores[at:at + count]) if x is not None])
            at += count
        per_group.append(taken)
        per_group_scores.append(scored)
        row += len(g.rows)
        mirrored += [k for k, m in zip(g.rows, g.mirror) if m]
        keep += [kp for kp, m in zip(g.keep_previous, g.mirror) if m]
    if len(deltas) != len(mirrored):
        raise TowerRequestError(f"the context tower sent {len(deltas)} cache deltas for "
                                f"{len(mirrored)} mirrored rows")
    # a delta's size is its tensors' bytes, as in process; its header is bookkeeping
    return ContextResult(per_group, per_group_scores,
                         [Delta(k, d, len(d) - HEADER_BYTES, kp)
                          for k, d, kp in zip(mirrored, deltas, keep)])


def encode_denoiser(work: DenoiserWork, secret: str) -> dict[str, np.ndarray]:
    inputs = {"op": _texts(["round"]), "tower_secret": _texts([secret]),
              **_keys("open", work.opened), **_keys("release", work.released),
              **_keys("delta", [d.row for d in work.deltas])}
    if work.deltas:
        inputs.update(cache_delta=np.array([bytes(d.payload) for d in work.deltas],
                                           dtype=np.object_),
                      keep_previous=np.array([d.keep_previous for d in work.deltas], bool))
    if work.groups:
        inputs.update(
            **_encode_groups([g.rows for g in work.groups], [g.blocks for g in work.groups]),
            settings=_texts([settings_to_json(s) for g in work.groups for s in g.settings]),
            step_key=_ints([k for g in work.groups for k in g.step_keys]),
            steps_left=_ints([n for g in work.groups for n in g.steps_left]))
    if work.mock is not None:
        m = work.mock
        inputs.update(**_keys("mock", m.rows), mock_latest=_ints(m.latest),
                      mock_settings=_texts([settings_to_json(s) for s in m.settings]),
                      mock_step_key=_ints(m.step_keys))
    return inputs


def denoiser_outputs(work: DenoiserWork) -> list[str]:
    return (["block_ids"] if work.groups else []) + (["token"] if work.mock else [])


def decode_denoiser_result(work: DenoiserWork, outputs: dict[str, np.ndarray]
                           ) -> DenoiserResult:
    flat = torch.from_numpy(outputs["block_ids"].reshape(-1).astype(np.int64)) \
        if work.groups else torch.zeros(0, dtype=torch.long)
    blocks, at = [], 0
    for g in work.groups:
        count = g.blocks.numel()
        blocks.append(flat[at:at + count].reshape(g.blocks.shape))
        at += count
    tokens = outputs["token"].reshape(-1).tolist() if work.mock is not None else []
    return DenoiserResult(blocks, [int(t) for t in tokens])


# --- the tower's side ----------------------------------------------------------------------
def _context_work(inputs: Inputs) -> ContextWork:
    rows = _read_keys(inputs, "row")
    groups = _groups(inputs, len(rows))
    mirror, samples = _get(inputs, "mirror"), _get(inputs, "sample")
    keys, targets = _get(inputs, "step_key"), _get(inputs, "target")
    chains = _get(inputs, "chain") if inputs.get("chain") is not None else \
        np.ones(len(rows), dtype=np.int64)
    for name, value in (("mirror", mirror), ("sample", samples), ("step_key", keys),
                        ("target", targets), ("chain", chains)):
        _need_length(name, value, len(rows))
    if chains.size and (chains.min() < 1 or chains[mirror.astype(bool)].max(initial=1) > 1
                        or chains[targets != NO_TOKEN].max(initial=1) > 1):
        raise TowerRequestError("chain must be at least 1, and 1 for a row the denoiser "
                                "mirrors or one given a target")
    sample = [Sample(settings_from_json(_text(s)), int(k), None if t == NO_TOKEN else int(t),
                     int(c))
              if _text(s) else None for s, k, t, c in zip(samples, keys, targets, chains)]
    return ContextWork(_read_keys(inputs, "open"),
                       [ExtendGroup(rows[at], ids, [bool(m) for m in mirror[at]],
                                    [False] * ids.shape[0], sample[at])
                        for at, ids in groups],
                       _read_keys(inputs, "release"))


def _denoiser_work(inputs: Inputs) -> DenoiserWork:
    delta_keys = _read_keys(inputs, "delta")
    payloads, keep = _get(inputs, "cache_delta"), _get(inputs, "keep_previous")
    _need_length("cache_delta", payloads, len(delta_keys))
    _need_length("keep_previous", keep, len(delta_keys))
    deltas = [Delta(k, np.frombuffer(p, dtype=np.uint8) if isinstance(p, bytes) else p,
                    len(p), bool(kp)) for k, p, kp in zip(delta_keys, payloads, keep)]
    rows = _read_keys(inputs, "row")
    settings, keys = _get(inputs, "settings"), _get(inputs, "step_key")
    steps_left = _get(inputs, "steps_left")
    for name, value in (("settings", settings), ("step_key", keys), ("steps_left", steps_left)):
        _need_length(name, value, len(rows))
    settings = _settings(settings)
    groups = [DenoiseGroup(rows[at], ids, settings[at], keys[at].astype(int).tolist(),
                           steps_left[at].astype(int).tolist())
              for at, ids in _groups(inputs, len(rows))]
    for group in groups:
        marked = group.blocks == FROM_TOWER
        going_on = marked.all(dim=1)
        if bool((marked.any(dim=1) != going_on).any()):
            raise TowerRequestError(f"a block is either all {FROM_TOWER} (it goes on from the "
                                    f"tower's last step) or ids")
        if min((n for n, own in zip(group.steps_left, going_on.tolist()) if not own),
               default=1) < 1:
            raise TowerRequestError("steps_left must be at least 1")
    mock_rows = _read_keys(inputs, "mock")
    mock = None
    if mock_rows:
        latest, mock_settings = _get(inputs, "mock_latest"), _get(inputs, "mock_settings")
        mock_keys = _get(inputs, "mock_step_key")
        for name, value in (("mock_latest", latest), ("mock_settings", mock_settings),
                            ("mock_step_key", mock_keys)):
            _need_length(name, value, len(mock_rows))
        mock = MockGroup(mock_rows, latest.astype(int).tolist(), _settings(mock_settings),
                         mock_keys.astype(int).tolist())
    return DenoiserWork(_read_keys(inputs, "open"), deltas, groups, mock,
                        _read_keys(inputs, "release"))


def handle(tower: Union[ContextTower, DenoiserTower], inputs: Inputs, secret: str
           ) -> dict[str, np.ndarray]:
    """Run one request on ``tower``; returns the outputs of its op. ``stats`` (counts only,
    no sequence ids) is open to monitoring; ``round`` needs the secret."""
    op = _text(_get(inputs, "op")[0]) if _get(inputs, "op").size else ""
    if op not in OPS:
        raise TowerRequestError(f"unknown op {op!r}; a tower serves {', '.join(OPS)}")
    if op == "stats":
        return {"stats": _texts([json.dumps({**tower.stats(),
                                             "frozen_objects": gc.get_freeze_count()})])}
    _authorize(inputs, secret)
    order = _get(inputs, "call_order")
    if order.size:
        _need_length("call_order", order, 2)
        tower.order.admit(int(order[0]), int(order[1]))
    if isinstance(tower, ContextTower):
        result = tower.round(_context_work(inputs))
        rows = [(taken, scored) for group, scores in zip(result.tokens, result.scores)
                for taken, scored in zip(group, scores)]
        return {"token": _ints([t for taken, _ in rows for t in taken]),
                "token_count": _ints([len(taken) for taken, _ in rows]),
                "cache_delta": np.array([d.payload.tobytes() for d in result.deltas],
                                        dtype=np.object_),
                "score": np.array([_score_json(x) for taken, scored in rows
                                   for x in (scored or [None] * len(taken))],
                                  dtype=np.object_)}
    result = tower.round(_denoiser_work(inputs))
    blocks = torch.cat([b.reshape(-1) for b in result.blocks]) if result.blocks else \
        torch.zeros(0, dtype=torch.long)
    return {"block_ids": blocks.numpy().astype(np.int64), "token": _ints(result.tokens)}
