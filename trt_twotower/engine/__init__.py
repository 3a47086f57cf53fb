"""TensorRT engines, one per tower and GPU: network passes, builds, manifests, executors."""
