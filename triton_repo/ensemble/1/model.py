"""Triton model `ensemble`: text_input → preprocessing → twotower_bls → postprocessing →
text_output, one response per message of the orchestrator (a committed block, or a few AR or
mock-AR tokens), cancellable end to end.

The orchestrator stops a request only when that request is cancelled, and in this Triton
(2.51, Python backend r24.10) nothing inside the server can cancel a request it sent: a
Triton ensemble does not pass a cancel on to a step already running, and a BLS stream's
response iterator has no cancel(). So the orchestrator's stream is opened over gRPC, on this
same server's own endpoint (loopback), where closing it is a cancel the orchestrator sees
within a block. Pre- and post-processing are plain BLS calls. Each request runs on its own
thread and polls its own cancellation while it waits for the next block."""

import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trt_twotower.serve.client import CLOSE_GRACE_S, close_stream
from trt_twotower.serve.hosting import server_grpc_url

ORCHESTRATOR = "twotower_bls"
SETTINGS = ("max_tokens", "stream", "temperature", "top_k", "top_p", "mode", "block_size",
            "steps_per_block", "confidence_threshold", "seed")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_SECONDS = 0.1  # how often a request waiting for a block looks for its cancellation
SHUTDOWN_SECONDS = 10.0  # within the server's exit timeout (serve/server.py: 15 s)


def _parent_argv():
    """The command line of the process that started this stub: tritonserver."""
    raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def _error(sender, message):
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


def _bls(model, inputs, outputs):
    """One plain BLS call; a refusal becomes a RuntimeError with the model's message."""
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                         requested_output_names=list(outputs)).exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}


def _grpc_inputs(tensors):
    """BLS output tensors as the gRPC client's inputs."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, tensor in tensors.items():
        array = tensor.as_numpy()
        inputs.append(grpcclient.InferInput(name, list(array.shape),
                                            np_to_triton_dtype(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    return inputs


class TritonPythonModel:
    def initialize(self, args):
        self.url = server_grpc_url(_parent_argv())
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
                _error(sender, str(err))
            except Exception:  # the client is gone; nothing is left to tell
                pass

    def _generate(self, request, sender):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = _grpc_inputs(_bls("preprocessing", request.inputs(), ("input_ids", *SETTINGS)))
        answers = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = True
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            client.async_stream_infer(ORCHESTRATOR, inputs, enable_empty_final_response=True)
            finished = self._relay(answers, sender)
        except InferenceServerException as err:
            _error(sender, err.message() or str(err))
        finally:  # a graceful close that a stopping server never answers is cut short
            close_stream(client, CLOSE_GRACE_S if finished else None)

    def _relay(self, answers, sender):
        """Pass each block on as text until the orchestrator's final response (True), or
        until this request is cancelled or the server stops (False)."""
        while True:
            if sender.is_cancelled() or self.stopping.is_set():
                sender.send(flags=FINAL)
                return False
            try:
                result, error = answers.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if error is not None:
                _error(sender, error.message() or str(error))
                return True
            final = result.get_response().parameters["triton_final_response"].bool_param
            ids, stats = result.as_numpy("output_ids"), result.as_numpy("stats")
            if ids is not None:
                text = _bls("postprocessing", [pb_utils.Tensor("output_ids", ids)],
                            ("text_output",))["text_output"]
                tensors = [text, pb_utils.Tensor("output_ids", ids)]
                if stats is not None:  # final answers only, as the orchestrator sends them
                    tensors.append(pb_utils.Tensor("stats", stats))
                sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if final else 0)
            elif final:
                sender.send(flags=FINAL)
            if final:
                return True

    def finalize(self):
        """Running requests stop (their orchestrator streams are cancelled); all of them get
        one shared deadline."""
        self.stopping.set()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
