"""The Triton Python model of both tower models (``context_tower``, ``denoiser_tower``): their
``model.py`` files import this class. It opens its tower on the instance's device (the
``instance_group`` decides: ``gpus: [0]`` for the context tower, ``[1]`` for the denoiser on
two GPUs) and answers each request through ``tower_requests.handle``. Only importable inside
Triton's Python backend."""

import json

import torch
import triton_python_backend_utils as pb_utils

from .hosting import instance_device, open_tower
from .tower_requests import handle

INPUTS = ("op", "sequence_id", "input_ids", "settings", "step_key", "cache_delta",
          "keep_previous")


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in
                  json.loads(args["model_config"])["parameters"].items()}
        if int(params["cpu_threads"]) > 0:  # towers sharing a CPU must not oversubscribe it
            torch.set_num_threads(int(params["cpu_threads"]))
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        self.tower = open_tower(params["tower"], params["source"], params["backend"], device,
                                int(params["max_context"]), int(params["capacity"]),
                                params["dtype"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = handle(self.tower, {name: _input(request, name) for name in INPUTS})
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, v) for n, v in outputs.items()]))
            except Exception as err:  # the request fails, the tower keeps serving
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(err).__name__}: {err}")))
        return responses
