"""Per-tower network definitions: ONNX step graphs with explicit, preallocated state, in a
native lowering (standard ONNX ops) and a plugin lowering (``trt_twotower`` custom ops)."""
