"""Triton model `preprocessing`: text_input → input_ids. A prompt with more bytes than any
prompt fitting the maximum context can have is refused before it is tokenized
(trt_twotower.serve.service.check_prompt_bytes)."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from trt_twotower.serve.service import RequestError, check_prompt_bytes, prompt_byte_limit
from trt_twotower.tokenizer import TOKENIZER_FILE, load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        directory = params["tokenizer_dir"]["string_value"]
        self.tokenizer = load_tokenizer(directory)
        vocabulary = Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE)).get_vocab()
        self.max_bytes = prompt_byte_limit(vocabulary,
                                           int(params["max_context"]["string_value"]))

    def execute(self, requests):
        return [self._encode(request) for request in requests]

    def _encode(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        raw = text if isinstance(text, bytes) else str(text).encode("utf-8")
        try:
            check_prompt_bytes(len(raw), self.max_bytes)
            prompt = raw.decode("utf-8")
        except RequestError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
        except UnicodeDecodeError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"text_input is not UTF-8 text ({err.reason} at byte {err.start})"))
        ids = np.asarray(self.tokenizer.encode(prompt), dtype=np.int64)
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", ids)])
