"""Triton model `preprocessing`: text_input → input_ids, plus every generation setting, each
as the request sent it or, left out, as `trt-twotower generate` defaults it
(GenerationSettings), so the orchestrator receives all of them. A prompt with more bytes than
any prompt fitting the maximum context can have is refused before it is tokenized
(trt_twotower.serve.service.check_prompt_bytes)."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from trt_twotower.policy import GenerationSettings
from trt_twotower.serve.service import RequestError, check_prompt_bytes, prompt_byte_limit
from trt_twotower.tokenizer import TOKENIZER_FILE, load_tokenizer

_CLI = GenerationSettings()
# (default, numpy dtype) per setting; top_k 0 and top_p 1.0 mean "off", as None does in
# GenerationSettings.
DEFAULTS = {"max_tokens": (_CLI.max_new_tokens, np.int32), "stream": (False, np.bool_),
            "temperature": (_CLI.temperature, np.float32), "top_k": (0, np.int32),
            "top_p": (1.0, np.float32), "mode": (_CLI.mode.encode(), np.object_),
            "block_size": (_CLI.block_size, np.int32),
            "steps_per_block": (_CLI.steps_per_block, np.int32),
            "confidence_threshold": (_CLI.confidence_threshold, np.float32),
            "seed": (_CLI.seed, np.int64)}


def settings_tensors(request):
    """Each setting as a one-element tensor: the request's own, or the default."""
    tensors = []
    for name, (default, dtype) in DEFAULTS.items():
        given = pb_utils.get_input_tensor_by_name(request, name)
        value = given.as_numpy().reshape(-1) if given is not None else np.array([default],
                                                                                dtype=dtype)
        tensors.append(pb_utils.Tensor(name, value))
    return tensors


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
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", ids),
                                           *settings_tensors(request)])
