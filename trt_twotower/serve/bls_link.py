"""The orchestrator's ``TowerPair``: the step loop's two calls per round, sent to the tower
models as one request each (``tower_requests.py``), carrying the server's tower secret.

Inside Triton a call is a BLS request (``pb_utils.InferenceRequest``); ``direct_call`` runs the
same encoded tensors against tower objects in this process, which is how the protocol is tested
without a server. Sequences get random keys (``SequenceKey.new``); a finished sequence's release
rides on the next round's calls, or goes alone when the loop falls idle. Every byte sent and
received is counted and charged to the rows of the call: the bytes that cross process
boundaries.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..errors import TwoTowerError
from ..runtime.tower_work import (ContextResult, ContextWork, DenoiserResult, DenoiserWork,
                                  Ref, RoundCalls)
from .repository import CONTEXT_MODEL, DENOISER_MODEL
from .tower_requests import (decode_context_result, decode_denoiser_result, denoiser_outputs,
                             encode_context, encode_denoiser, handle)
from .towers import ContextTower, DenoiserTower, SequenceKey

# (model name, named inputs, output names) -> named outputs
TowerCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class TowerCallError(TwoTowerError, RuntimeError):
    """A tower model answered with an error (its message is kept)."""


def nbytes(value: np.ndarray) -> int:
    if value.dtype == np.object_:
        return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value.reshape(-1))
    return int(value.nbytes)


def bls_call(pb_utils: Any) -> TowerCall:
    """Tower calls as BLS requests from inside a Triton Python model."""
    def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]
             ) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise TowerCallError(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
                for name in outputs}
    return call


def direct_call(context: ContextTower, denoiser: DenoiserTower, secret: str) -> TowerCall:
    """The same requests answered by tower objects in this process."""
    towers = {CONTEXT_MODEL: context, DENOISER_MODEL: denoiser}

    def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]
             ) -> dict[str, np.ndarray]:
        try:
            answer = handle(towers[model], inputs, secret)
        except TwoTowerError as err:
            raise TowerCallError(f"{model}: {err}") from None
        return {name: answer[name] for name in outputs}
    return call


class RemoteTowers:
    """Both tower models behind a ``TowerCall``."""

    def __init__(self, call: TowerCall, secret: str, capacity: int) -> None:
        self.call, self.secret, self.capacity = call, secret, capacity
        self.open: dict[SequenceKey, bool] = {}    # open sequences: mirrored on the denoiser?
        self.pending: dict[str, list[SequenceKey]] = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
        self.waited: dict[str, list[SequenceKey]] = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
        self._calls = RoundCalls(at_once=True)

    def new_ref(self) -> Ref:
        return SequenceKey.new()

    def _send(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
              ) -> tuple[dict[str, np.ndarray], int]:
        """The tower's outputs and the bytes the call moved between processes."""
        out = self.call(model, inputs, outputs)
        return out, sum(map(nbytes, inputs.values())) + sum(map(nbytes, out.values()))

    def _releases(self, model: str) -> list[SequenceKey]:
        released, self.pending[model] = self.pending[model], []
        return released

    def run(self, context: Optional[ContextWork], denoiser: Optional[DenoiserWork]
            ) -> tuple[Optional[ContextResult], Optional[DenoiserResult]]:
        """Both calls at once, the context's on a helper thread: the tower models are apart,
        so neither waits for the other. This thread settles what each call carries first."""
        if context is not None:
            context.released = self._releases(CONTEXT_MODEL)
            for key in context.opened:
                self.open[key] = False
        if denoiser is not None:
            denoiser.released = self._releases(DENOISER_MODEL)
            for key in denoiser.opened:
                self.open[key] = True
        return self._calls.run(None if context is None else lambda: self._context(context),
                               None if denoiser is None else lambda: self._denoiser(denoiser))

    def _context(self, work: ContextWork) -> ContextResult:
        outputs = ["token", "token_count", "cache_delta", "score"] if work.groups else []
        out, crossed = self._send(CONTEXT_MODEL, encode_context(work, self.secret), outputs)
        result = decode_context_result(work, out)
        result.crossed = crossed
        return result

    def _denoiser(self, work: DenoiserWork) -> DenoiserResult:
        out, crossed = self._send(DENOISER_MODEL, encode_denoiser(work, self.secret),
                                  denoiser_outputs(work))
        result = decode_denoiser_result(work, out)
        result.crossed = crossed
        return result

    def release(self, refs: list[tuple[Ref, bool]]) -> None:
        for key, _ in refs:
            mirrored = self.open.pop(key, False)
            self.pending[CONTEXT_MODEL].append(key)
            if mirrored:
                self.pending[DENOISER_MODEL].append(key)

    def settle(self, idle: bool) -> None:
        """Releases ride on the next round's calls; what a round did not carry (it made no
        call to that tower), or everything once the loop falls idle, goes alone now."""
        for model, empty, encode in ((CONTEXT_MODEL, ContextWork, encode_context),
                                     (DENOISER_MODEL, DenoiserWork, encode_denoiser)):
            waited = set(self.waited[model])
            late = [k for k in self.pending[model] if idle or k in waited]
            if late:
                self.pending[model] = [k for k in self.pending[model]
                                       if not (idle or k in waited)]
                self._send(model, encode(empty(released=late), self.secret), [])
            self.waited[model] = list(self.pending[model])

    def forget(self) -> None:
        """After a failed round: ask both towers to free every sequence this loop opened
        (best effort: a tower that failed may be gone)."""
        self.release([(key, True) for key in list(self.open)])
        try:
            self.settle(idle=True)
        except Exception:  # noqa: BLE001 - the round's own error is the one reported
            self.pending = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
