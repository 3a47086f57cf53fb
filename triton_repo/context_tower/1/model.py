"""Triton model `context_tower`: the shared tower model class (trt_twotower.serve.triton_tower).

The step loop calls the two towers in turn, each with every core; OpenMP threads that spin
after a step would hold the cores the other tower needs next, so they sleep instead (set
before torch loads OpenMP)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from trt_twotower.serve.triton_tower import TritonPythonModel  # noqa: E402,F401
