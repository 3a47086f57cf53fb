"""The orchestrator's link to the tower models from inside Triton: each tower call is a BLS
request (``pb_utils.InferenceRequest``) to ``context_tower`` or ``denoiser_tower``, carrying the
server's tower secret and the sequence's owner token. The link counts every byte it sends and
receives — the bytes that cross process boundaries."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TwoTowerError
from ..policy import GenerationSettings
from .repository import CONTEXT_MODEL, DENOISER_MODEL, TOWER_MODELS
from .towers import SequenceKey, settings_to_json


class TowerCallError(TwoTowerError, RuntimeError):
    """A tower model answered a BLS call with an error (its message is kept)."""


def _nbytes(value: np.ndarray) -> int:
    if value.dtype == np.object_:
        return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value.reshape(-1))
    return int(value.nbytes)


def _text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


class BlsLink:
    def __init__(self, pb_utils: Any, secret: str) -> None:
        self.pb, self.secret = pb_utils, secret
        self.boundary_bytes = 0

    def _call(self, model: str, op: str, sequence: SequenceKey, outputs: list[str],
              **inputs: np.ndarray) -> dict[str, np.ndarray]:
        inputs = {"op": _text(op), "tower_secret": _text(self.secret),
                  "sequence_id": np.array([sequence.id], dtype=np.uint64),
                  "owner": _text(sequence.owner), **inputs}
        request = self.pb.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[self.pb.Tensor(name, value) for name, value in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise TowerCallError(f"{model} ({op}): {response.error().message()}")
        out = {name: self.pb.get_output_tensor_by_name(response, name).as_numpy()
               for name in outputs}
        self.boundary_bytes += sum(map(_nbytes, inputs.values())) + sum(map(_nbytes,
                                                                             out.values()))
        return out

    @staticmethod
    def _ids(ids: list[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    def open(self, sequence: SequenceKey, denoiser: bool) -> None:
        """Open the sequence on the context tower, and on the denoiser when the mode uses it
        (AR never does, so its request holds no denoiser slot)."""
        for model in TOWER_MODELS if denoiser else (CONTEXT_MODEL,):
            self._call(model, "open", sequence, ["opened"])

    def context_extend(self, sequence: SequenceKey, ids: list[int]) -> np.ndarray:
        return self._call(CONTEXT_MODEL, "extend", sequence, ["cache_delta"],
                          input_ids=self._ids(ids))["cache_delta"]

    def context_extend_and_sample(self, sequence: SequenceKey, ids: list[int],
                                  settings: GenerationSettings, step_key: int) -> int:
        out = self._call(CONTEXT_MODEL, "extend_and_sample", sequence, ["token"],
                         input_ids=self._ids(ids), settings=_text(settings_to_json(settings)),
                         step_key=np.array([step_key], dtype=np.int64))
        return int(out["token"][0])

    def denoiser_append(self, sequence: SequenceKey, delta: np.ndarray,
                        keep_previous: bool) -> None:
        self._call(DENOISER_MODEL, "append", sequence, ["length"], cache_delta=delta,
                   keep_previous=np.array([keep_previous], dtype=bool))

    def denoiser_step(self, sequence: SequenceKey, block: list[int], settings: GenerationSettings,
                      step_key: int) -> list[int]:
        out = self._call(DENOISER_MODEL, "step", sequence, ["block_ids"],
                         input_ids=self._ids(block), settings=_text(settings_to_json(settings)),
                         step_key=np.array([step_key], dtype=np.int64))
        return out["block_ids"].tolist()

    def denoiser_mock_ar(self, sequence: SequenceKey, token: int, settings: GenerationSettings,
                         step_key: int) -> int:
        out = self._call(DENOISER_MODEL, "mock_ar", sequence, ["token"],
                         input_ids=self._ids([token]), settings=_text(settings_to_json(settings)),
                         step_key=np.array([step_key], dtype=np.int64))
        return int(out["token"][0])

    def release(self, sequence: SequenceKey) -> None:
        """Both towers free the sequence; a failure to release is reported, not hidden."""
        errors = []
        for model in TOWER_MODELS:
            try:  # each tower is asked whatever happened to the other
                self._call(model, "release", sequence, ["released"])
            except Exception as err:
                errors.append(str(err))
        if errors:
            raise TowerCallError("; ".join(errors))
