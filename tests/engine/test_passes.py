"""Each network pass on a small hand-built TensorRT-RTX network."""

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")

from trt_twotower.config import preset  # noqa: E402
from trt_twotower import names  # noqa: E402
from trt_twotower.engine.network import (NetworkError, check_precision,  # noqa: E402
                                         mark_attention_decomposable, mark_outputs, name_layers,
                                         profiles)


def _network():
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    return builder, network


def test_fp32_router_topk_passes_and_fp16_is_named():
    for dtype, ok in ((trt.float32, True), (trt.float16, False)):
        _, network = _network()
        scores = network.add_input("scores", dtype, (4, 16))
        topk = network.add_topk(scores, trt.TopKOperation.MAX, 2, 1 << 1)
        topk.name = "context.layers.1.moe/TopK"
        network.mark_output(topk.get_output(1))
        if ok:
            assert check_precision(trt, network) == 1
        else:
            with pytest.raises(NetworkError, match="context.layers.1.moe/TopK"):
                check_precision(trt, network)


def _attention_network(dtype):
    builder, network = _network()
    q = network.add_input("q", dtype, (1, 4, 8, 16))
    k = network.add_input("k", dtype, (1, 2, 8, 16))
    v = network.add_input("v", dtype, (1, 2, 8, 16))
    attention = network.add_attention_v2(q, k, v, trt.AttentionNormalizationOp.SOFTMAX,
                                         trt.CausalMaskKind.NONE)
    network.mark_output(attention.get_output(0))
    return builder, network


def test_fp32_attention_is_marked_decomposable_and_then_builds():
    builder, network = _attention_network(trt.float32)
    config = builder.create_builder_config()
    assert builder.build_serialized_network(network, config) is None
    builder, network = _attention_network(trt.float32)
    assert mark_attention_decomposable(trt, network) == 1
    assert builder.build_serialized_network(network, builder.create_builder_config()) is not None


def test_half_precision_attention_is_left_fused():
    _, network = _attention_network(trt.float16)
    assert mark_attention_decomposable(trt, network) == 0


def test_layer_names_carry_the_graph_and_the_exporter_scope():
    _, network = _network()
    x = network.add_input("x", trt.float32, (2, 2))
    layer = network.add_unary(x, trt.UnaryOperation.EXP)
    layer.name = "denoiser.layers.0.mamba/Exp_3"
    network.mark_output(layer.get_output(0))
    name_layers(network, "denoiser_step")
    name_layers(network, "denoiser_step")
    assert network.get_layer(0).name == "denoiser_step:denoiser.layers.0.mamba/Exp_3"


def test_missing_outputs_are_named():
    _, network = _network()
    x = network.add_input("x", trt.float32, (2, 2))
    layer = network.add_identity(x)
    layer.get_output(0).name = "logits"
    network.mark_output(layer.get_output(0))
    with pytest.raises(NetworkError, match="present_key"):
        mark_outputs(network, preset("tiny"), 16, names.CONTEXT_STEP)


def test_profiles_cover_decode_block_and_prefill():
    specs = profiles(preset("tiny"), names.CONTEXT_STEP, max_context=64, max_batch=8,
                     block_size=16, max_prefill=48)
    ranges = {s.name: s.shapes["input_ids"] for s in specs}
    assert ranges["decode"] == ((1, 1), (4, 1), (8, 1))
    assert ranges["block"] == ((1, 16), (4, 16), (8, 16))
    assert ranges["prefill"] == ((1, 1), (4, 48), (8, 48))
    assert specs[0].shapes["past_key.2"][2] == (8, 2, 64, 16)
    denoiser = profiles(preset("tiny"), names.DENOISER_STEP, 64, 8, 16, 48)
    assert [s.name for s in denoiser] == ["block"]
    assert "t" in denoiser[0].shapes and "confidence_threshold" not in denoiser[0].shapes
