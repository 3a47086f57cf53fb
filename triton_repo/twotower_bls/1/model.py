"""Triton model `twotower_bls`: thin glue around trt_twotower.serve (validation in service.py,
the block loop in orchestrator.py, the tower calls in bls_link.py). Each request runs on its
own thread, so concurrent requests interleave their tower calls; the towers' `capacity`
sequence slots are split between this model's instances, and requests beyond an instance's
share wait their turn (a request cancelled while waiting never starts). Each request's
sequence gets a fresh random id and owner token, and every tower call carries the
repository's tower secret, which clients never see."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from trt_twotower.serve.bls_link import BlsLink
from trt_twotower.serve.hosting import source_config
from trt_twotower.serve.orchestrator import generate
from trt_twotower.serve.repository import tower_secret
from trt_twotower.serve.service import (RequestError, ServiceLimits, settings_from_inputs,
                                        stats_json)
from trt_twotower.serve.towers import SequenceKey

SCALARS = ("max_tokens", "stream", "temperature", "top_k", "top_p", "mode", "block_size",
           "steps_per_block", "confidence_threshold", "seed")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SHUTDOWN_SECONDS = 20.0


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _response(ids, stats=b""):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
        pb_utils.Tensor("stats", np.array([stats], dtype=np.object_))])


def _error(sender, message):
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in
                  json.loads(args["model_config"])["parameters"].items()}
        self.limits = ServiceLimits(int(params["max_context"]), int(params["max_tokens"]),
                                    tuple(int(b) for b in params["block_sizes"].split(",")))
        self.config = source_config(params["source"], params["backend"])
        self.secret = tower_secret(args["model_repository"])
        self.slots = threading.Semaphore(int(params["capacity"]) // int(params["instances"]))
        self.stopping = threading.Event()
        self.threads = []

    def execute(self, requests):
        self.threads = [t for t in self.threads if t.is_alive()]
        for request in requests:
            sender = request.get_response_sender()
            thread = threading.Thread(target=self._serve, args=(request, sender), daemon=True)
            thread.start()
            self.threads.append(thread)
        return None

    def _serve(self, request, sender):
        try:
            self._generate(request, sender)
        except Exception as err:  # whatever failed, the client gets a final answer
            try:
                _error(sender, f"{type(err).__name__}: {err}")
            except Exception:  # the client is gone; nothing is left to tell
                pass

    def _generate(self, request, sender):
        try:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
            values = {name: _scalar(request, name) for name in SCALARS}
            settings = settings_from_inputs(values, len(ids), self.limits)
        except RequestError as err:
            return _error(sender, str(err))
        stream = bool(values["stream"])

        def on_block(block_ids):
            if sender.is_cancelled() or self.stopping.is_set():
                return False
            if stream:
                sender.send(_response(block_ids))
            return None

        link = BlsLink(pb_utils, self.secret)
        with self.slots:
            if self.stopping.is_set():
                return _error(sender, "the server is shutting down")
            if sender.is_cancelled():
                return sender.send(flags=FINAL)
            try:
                result = generate(link, SequenceKey.new(), [int(i) for i in ids], settings,
                                  self.config, on_block)
            except Exception as err:  # a tower refused or failed: this request ends, not the server
                return _error(sender, str(err))
        if result.cancelled and self.stopping.is_set() and not sender.is_cancelled():
            _error(sender, "the server is shutting down; the request was stopped")
        elif result.cancelled:
            sender.send(flags=FINAL)
        else:
            sender.send(_response([] if stream else result.tokens,
                                  stats_json(result, link.boundary_bytes)), flags=FINAL)

    def finalize(self):
        """Running requests stop at their next block (their towers release them); all of
        them get one shared deadline."""
        self.stopping.set()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
