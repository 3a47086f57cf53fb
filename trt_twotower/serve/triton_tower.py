"""The Triton Python model of both tower models (``context_tower``, ``denoiser_tower``): their
``model.py`` files import this class. It opens its tower on the instance's device (the
``instance_group`` decides: ``gpus: [0]`` for the context tower, ``[1]`` for the denoiser on
two GPUs) and answers each request through ``tower_requests.handle``, refusing any that lacks
the repository's tower secret. Only importable inside Triton's Python backend."""

import json

import torch
import triton_python_backend_utils as pb_utils

from ..errors import TwoTowerError
from ..runtime.heap import freeze_long_lived, keep_freed_memory
from .hosting import instance_device, open_tower
from .repository import tower_secret
from .tower_requests import handle
from .towers import CallOutOfOrder, TowerBusy, UnknownSequence

INPUTS = ("op", "tower_secret", "open_id", "open_owner", "release_id", "release_owner",
          "row_id", "row_owner", "group_rows", "group_width", "input_ids", "mirror", "sample",
          "step_key", "delta_id", "delta_owner", "cache_delta", "keep_previous", "settings",
          "steps_left", "mock_id", "mock_owner", "mock_latest", "mock_settings",
          "mock_step_key", "target", "chain", "call_order")


def error_message(err: Exception) -> str:
    """One line for the caller: a request error's own message; for anything else its type
    and first line only, never a stack or a parser's internals."""
    if isinstance(err, TwoTowerError):
        return " ".join(str(err).split())
    first = (str(err).strip().splitlines() or [""])[0]
    return f"internal tower error ({type(err).__name__}): {first}"


def error_code(err: Exception) -> int:
    """The Triton status a caller can act on: a bad request, a sequence it does not hold, or
    a full tower (retry later); anything else is the server's fault."""
    if isinstance(err, UnknownSequence):
        return pb_utils.TritonError.NOT_FOUND
    if isinstance(err, (TowerBusy, CallOutOfOrder)):
        return pb_utils.TritonError.UNAVAILABLE
    if isinstance(err, TwoTowerError):
        return pb_utils.TritonError.INVALID_ARG
    return pb_utils.TritonError.INTERNAL


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        keep_freed_memory()  # a step's buffers reused, not faulted in again (heap.py)
        params = {k: v["string_value"] for k, v in
                  json.loads(args["model_config"])["parameters"].items()}
        if int(params["cpu_threads"]) > 0:  # towers sharing a CPU must not oversubscribe it
            torch.set_num_threads(int(params["cpu_threads"]))
        self.secret = tower_secret(args["model_repository"])
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        self.tower = open_tower(params["tower"], params["source"], params["backend"], device,
                                int(params["max_context"]), int(params["capacity"]),
                                params["dtype"])
        freeze_long_lived()  # the model and its pools live as long as the process

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = handle(self.tower, {name: _input(request, name) for name in INPUTS},
                                 self.secret)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, v) for n, v in outputs.items()]))
            except Exception as err:  # the request fails, the tower keeps serving
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(error_message(err), error_code(err))))
        return responses
