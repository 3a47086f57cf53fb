"""trt-twotower: Nemotron-Labs-TwoTower from its checkpoint to TensorRT engines served by
Triton, with a PyTorch reference as the ground truth of every stage."""

__version__ = "0.1.0"
