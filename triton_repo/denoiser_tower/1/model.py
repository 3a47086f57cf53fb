"""Triton model `denoiser_tower`: the shared tower model class (trt_twotower.serve.triton_tower)."""

from trt_twotower.serve.triton_tower import TritonPythonModel  # noqa: F401
