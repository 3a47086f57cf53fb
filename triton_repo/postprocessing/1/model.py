"""Triton model `postprocessing`: output_ids → text_output."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trt_twotower.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = load_tokenizer(params["tokenizer_dir"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1)
            text = self.tokenizer.decode(ids.tolist()).encode("utf-8")
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("text_output", np.array([text], dtype=np.object_))]))
        return responses
