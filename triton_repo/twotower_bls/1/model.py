"""Triton model `twotower_bls`: thin glue around trt_twotower.serve.service."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trt_twotower.serve.service import (RequestError, ServiceLimits, open_session, run,
                                        settings_from_inputs, stats_json)

SCALARS = ("max_tokens", "stream", "temperature", "top_k", "top_p", "mode", "block_size",
           "steps_per_block", "confidence_threshold", "seed")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _response(ids, stats=b""):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
        pb_utils.Tensor("stats", np.array([stats], dtype=np.object_))])


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in
                  json.loads(args["model_config"])["parameters"].items()}
        self.limits = ServiceLimits(int(params["max_context"]), int(params["max_tokens"]),
                                    tuple(int(b) for b in params["block_sizes"].split(",")))
        self.session = open_session(params["source"], params["backend"], params["device"],
                                    self.limits.max_context)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
                values = {name: _scalar(request, name) for name in SCALARS}
                settings = settings_from_inputs(values, len(ids), self.limits)
            except RequestError as err:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))),
                            flags=FINAL)
                continue
            stream = bool(values["stream"])

            def on_block(block_ids, sender=sender, stream=stream):
                if sender.is_cancelled():
                    return False
                if stream:
                    sender.send(_response(block_ids))
                return None

            result = run(self.session, ids, settings, on_block)
            if result.cancelled:
                sender.send(flags=FINAL)
            else:
                sender.send(_response([] if stream else result.tokens, stats_json(result)),
                            flags=FINAL)
        return None
