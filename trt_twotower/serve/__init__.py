"""Serving through Triton Inference Server: the model repository, the server process and the
gRPC client."""
