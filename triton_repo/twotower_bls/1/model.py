"""Triton model `twotower_bls`: thin glue around trt_twotower.serve.orchestrator. One step loop
serves every request: each round is one batched BLS call per tower model. Requests are
validated here (service.py), answered through their response senders, and cancelled in the loop
when their client goes away. Every tower call carries the repository's tower secret, which
clients never see."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trt_twotower.runtime.heap import freeze_long_lived, keep_freed_memory
from trt_twotower.runtime.scheduler import SchedulerLimits
from trt_twotower.serve.bls_link import bls_call
from trt_twotower.serve.hosting import source_config
from trt_twotower.serve.orchestrator import Orchestrator, scores_json
from trt_twotower.serve.repository import tower_secret
from trt_twotower.serve.service import (RequestError, ServiceLimits, settings_from_inputs,
                                        stats_json)

SCALARS = ("max_tokens", "stream", "temperature", "top_k", "top_p", "mode", "block_size",
           "steps_per_block", "confidence_threshold", "seed", "forced_commits", "ignore_eos",
           "logprobs", "echo")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SHUTDOWN_SECONDS = 10.0  # within the server's exit timeout (serve/server.py: 15 s)


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _response(ids, stats=None, scores=None):
    """Tokens, with stats (final answers) and scores (requests asking for them) only where
    there are some: a streamed message of empty strings cost every process it crossed, the
    client's too (AR at 64 clients, alternating runs: Triton at 0.81x the in-process engine
    with them, 0.99x without)."""
    tensors = [pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64))]
    if stats is not None:
        tensors.append(pb_utils.Tensor("stats", np.array([stats], dtype=np.object_)))
    if scores is not None:
        tensors.append(pb_utils.Tensor("logprobs", np.array([json.dumps(scores).encode()],
                                                            dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(sender, message):
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class _Responder:
    """A request's response sender, as the orchestrator answers through it."""

    def __init__(self, sender, stream, settings):
        self.sender, self.stream, self.settings = sender, stream, settings

    def block(self, ids, scores):
        if self.stream:
            self.sender.send(_response(ids, scores=scores))

    def finish(self, result, ids, scores):
        if result.cancelled:
            self.sender.send(flags=FINAL)
        elif self.stream:
            self.sender.send(_response(ids, stats_json(result), scores), flags=FINAL)
        else:
            every = None if self.settings.logprobs is None else {
                "tokens": scores_json(result.logprobs),
                "prompt": scores_json(result.prompt_logprobs)}
            self.sender.send(_response(result.tokens, stats_json(result), every), flags=FINAL)

    def fail(self, message):
        _error(self.sender, message)

    def gone(self):
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        keep_freed_memory()  # each round's buffers reused, not faulted in again (heap.py)
        params = {k: v["string_value"] for k, v in
                  json.loads(args["model_config"])["parameters"].items()}
        self.limits = ServiceLimits(int(params["max_context"]), int(params["max_tokens"]),
                                    tuple(int(b) for b in params["block_sizes"].split(",")))
        capacity = int(params["capacity"]) // int(params["instances"])
        loop = SchedulerLimits(capacity=capacity, prefill_tokens=int(params["prefill_tokens"]),
                               ar_steps=int(params["ar_steps"]))
        self.orchestrator = Orchestrator(
            bls_call(pb_utils), tower_secret(args["model_repository"]),
            source_config(params["source"], params["backend"]), self.limits.max_context,
            loop, int(params["max_waiting"]), int(params["stream_interval"]))
        freeze_long_lived()  # full collections walked the set-up's objects: 74 ms stalls

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                values = {name: _scalar(request, name) for name in SCALARS}
                settings = settings_from_inputs(values, ids.size, self.limits)
                self.orchestrator.submit([int(i) for i in ids.reshape(-1)], settings,
                                         _Responder(sender, bool(values["stream"]), settings))
            except RequestError as err:
                _error(sender, str(err))
            except Exception as err:  # busy, a prompt the loop refuses: this request only
                _error(sender, " ".join(str(err).split()))
        return None

    def finalize(self):
        self.orchestrator.close(SHUTDOWN_SECONDS)
