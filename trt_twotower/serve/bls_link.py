"""The orchestrator's ``TowerPair``: the step loop's two calls per round, sent to the tower
models as one request each (``tower_requests.py``), carrying the server's tower secret.

Inside Triton a call is a BLS request (``pb_utils.InferenceRequest``); ``direct_call`` runs the
same encoded tensors against tower objects in this process, which is how the protocol is tested
without a server. Sequences get random keys (``SequenceKey.new``); a finished sequence's release
rides on the next round's calls, or goes alone when the loop falls idle. Every byte sent and
received is counted and charged to the rows of the call: the bytes that cross process
boundaries.

Calls start on helper threads and the loop may start a round before the last one is answered
(``ahead``); each carries this loop's caller id and its index per tower, numbered as the loop
starts it, so a tower runs them in that order (one that overtook its predecessor is refused
untouched and sent again once the predecessor is answered).
"""

from __future__ import annotations

import secrets
import threading
from typing import Any, Callable, Optional

import numpy as np

from ..errors import TwoTowerError
from ..runtime.tower_work import (ContextResult, ContextWork, DenoiserResult, DenoiserWork,
                                  PendingRound, Ref, RoundCalls)
from .repository import CONTEXT_MODEL, DENOISER_MODEL
from .tower_requests import (decode_context_result, decode_denoiser_result, denoiser_outputs,
                             encode_context, encode_denoiser, handle)
from .towers import OUT_OF_ORDER, CallOutOfOrder, ContextTower, DenoiserTower, SequenceKey

# (model name, named inputs, output names) -> named outputs
TowerCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class TowerCallError(TwoTowerError, RuntimeError):
    """A tower model answered with an error (its message is kept)."""


class TowerCallOutOfOrder(TowerCallError):
    """The tower refused a call that overtook an earlier one of this caller; nothing ran."""


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
            message = response.error().message()
            kind = TowerCallOutOfOrder if message.startswith(OUT_OF_ORDER) else TowerCallError
            raise kind(f"{model}: {message}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
                for name in outputs}
    return call


def direct_call(context: ContextTower, denoiser: DenoiserTower, secret: str) -> TowerCall:
    """The same requests answered by tower objects in this process, one call at a time per
    tower as a Triton model instance runs them."""
    towers = {CONTEXT_MODEL: context, DENOISER_MODEL: denoiser}
    locks = {model: threading.Lock() for model in towers}

    def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]
             ) -> dict[str, np.ndarray]:
        try:
            with locks[model]:
                answer = handle(towers[model], inputs, secret)
        except CallOutOfOrder as err:
            raise TowerCallOutOfOrder(f"{model}: {err}") from None
        except TwoTowerError as err:
            raise TowerCallError(f"{model}: {err}") from None
        return {name: answer[name] for name in outputs}
    return call


class RemoteTowers:
    """Both tower models behind a ``TowerCall``."""

    ahead = True

    def __init__(self, call: TowerCall, secret: str, capacity: int) -> None:
        self.call, self.secret, self.capacity = call, secret, capacity
        self.open: dict[SequenceKey, bool] = {}    # open sequences: mirrored on the denoiser?
        self.pending: dict[str, list[SequenceKey]] = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
        self.waited: dict[str, list[SequenceKey]] = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
        self._calls = RoundCalls(at_once=True, ahead=True)
        self._number_afresh()

    def _number_afresh(self) -> None:
        """A new caller id whose calls count from 1 (also after a failed round: a call that
        never reached its tower must not hold back every later one)."""
        self._caller = secrets.randbits(62)
        self._started = {CONTEXT_MODEL: 0, DENOISER_MODEL: 0}
        self._answered: dict[str, threading.Event] = {}

    def new_ref(self) -> Ref:
        return SequenceKey.new()

    def _prepare(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
                 ) -> Callable[[], tuple[dict[str, np.ndarray], int]]:
        """The call numbered now, in the order the loop starts calls; run it (on any thread)
        for the tower's outputs and the bytes the call moved between processes."""
        self._started[model] += 1
        inputs["call_order"] = np.array([self._caller, self._started[model]], dtype=np.int64)
        before, answered = self._answered.get(model), threading.Event()
        self._answered[model] = answered

        def send() -> tuple[dict[str, np.ndarray], int]:
            try:
                try:
                    out = self.call(model, inputs, outputs)
                except TowerCallOutOfOrder:
                    if before is None:
                        raise
                    before.wait()
                    out = self.call(model, inputs, outputs)
            finally:
                answered.set()
            return out, sum(map(nbytes, inputs.values())) + sum(map(nbytes, out.values()))
        return send

    def _releases(self, model: str) -> list[SequenceKey]:
        released, self.pending[model] = self.pending[model], []
        return released

    def start(self, context: Optional[ContextWork], denoiser: Optional[DenoiserWork]
              ) -> PendingRound:
        """Both calls at once on helper threads: the tower models are apart, so neither
        waits for the other, and the loop goes on while they run. This thread settles what
        each call carries and numbers it first."""
        if context is not None:
            context.released = self._releases(CONTEXT_MODEL)
            for key in context.opened:
                self.open[key] = False
        if denoiser is not None:
            denoiser.released = self._releases(DENOISER_MODEL)
            for key in denoiser.opened:
                self.open[key] = True
        return self._calls.start(None if context is None else self._context(context),
                                 None if denoiser is None else self._denoiser(denoiser))

    def _context(self, work: ContextWork) -> Callable[[], ContextResult]:
        outputs = ["token", "token_count", "cache_delta", "score"] if work.groups else []
        return self._call(CONTEXT_MODEL, encode_context(work, self.secret), outputs,
                          lambda out: decode_context_result(work, out))

    def _denoiser(self, work: DenoiserWork) -> Callable[[], DenoiserResult]:
        return self._call(DENOISER_MODEL, encode_denoiser(work, self.secret),
                          denoiser_outputs(work), lambda out: decode_denoiser_result(work, out))

    def _call(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              decode: Callable[[dict[str, np.ndarray]], Any]) -> Callable[[], Any]:
        """A call numbered now; run it for its decoded result with the bytes it moved."""
        send = self._prepare(model, inputs, outputs)

        def call() -> Any:
            out, crossed = send()
            result = decode(out)
            result.crossed = crossed
            return result
        return call

    def release(self, refs: list[Ref]) -> None:
        for key in refs:
            mirrored = self.open.pop(key, False)
            self.pending[CONTEXT_MODEL].append(key)
            if mirrored:
                self.pending[DENOISER_MODEL].append(key)

    def settle(self, idle: bool) -> None:
        """Releases ride on the next round's calls; what a round did not carry (it made no
        call to that tower, and none is under way there), or everything once the loop falls
        idle, goes alone now."""
        for model, empty, encode in ((CONTEXT_MODEL, ContextWork, encode_context),
                                     (DENOISER_MODEL, DenoiserWork, encode_denoiser)):
            under_way = self._answered.get(model)
            if not idle and under_way is not None and not under_way.is_set():
                continue  # the next call there carries them
            waited = set(self.waited[model])
            late = [k for k in self.pending[model] if idle or k in waited]
            if late:
                self.pending[model] = [k for k in self.pending[model]
                                       if not (idle or k in waited)]
                self._prepare(model, encode(empty(released=late), self.secret), [])()
            self.waited[model] = list(self.pending[model])

    def forget(self) -> None:
        """After a failed round: ask both towers to free every sequence this loop opened
        (best effort: a tower that failed may be gone)."""
        self._number_afresh()
        self.release(list(self.open))
        try:
            self.settle(idle=True)
        except Exception:  # noqa: BLE001 - the round's own error is the one reported
            self.pending = {CONTEXT_MODEL: [], DENOISER_MODEL: []}
