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
    assert [s.name for s in denoiser] == ["block", "mock-ar"]
    assert denoiser[0].shapes["block_ids"] == ((1, 16), (4, 16), (8, 16))
    assert denoiser[1].shapes["block_ids"] == ((1, 1), (4, 1), (8, 1))
    assert denoiser[1].shapes["modulated"] == ((1,), (4,), (8,))
    assert denoiser[0].shapes["confidence_threshold"] == ((1,), (4,), (8,))  # one γ per row


def _router(matmul_dtype):
    """x @ W → (cast) → Sigmoid → + bias → TopK, the MoE router's shape (spec §2.5)."""
    _, network = _network()
    x = network.add_input("x", matmul_dtype, (4, 8))
    w = network.add_constant((8, 16), trt.Weights(np.ones((8, 16), dtype=np.float32)))
    w_in = w.get_output(0)
    if matmul_dtype != trt.float32:
        w_in = network.add_cast(w_in, matmul_dtype).get_output(0)
    logits = network.add_matrix_multiply(x, trt.MatrixOperation.NONE, w_in,
                                         trt.MatrixOperation.NONE)
    logits.name = "context.layers.1.moe/MatMul_7"
    scores = logits.get_output(0)
    if matmul_dtype != trt.float32:
        scores = network.add_cast(scores, trt.float32).get_output(0)
    sigmoid = network.add_activation(scores, trt.ActivationType.SIGMOID)
    bias = network.add_constant((1, 16), trt.Weights(np.zeros((1, 16), dtype=np.float32)))
    biased = network.add_elementwise(sigmoid.get_output(0), bias.get_output(0),
                                     trt.ElementWiseOperation.SUM)
    topk = network.add_topk(biased.get_output(0), trt.TopKOperation.MAX, 2, 1 << 1)
    network.mark_output(topk.get_output(1))
    return network


def test_router_matmul_in_fp32_passes_and_in_bf16_is_named():
    assert check_precision(trt, _router(trt.float32)) == 4  # TopK + MatMul, Sigmoid, Add
    with pytest.raises(NetworkError, match=r"context.layers.1.moe/MatMul_7.*MoE router"):
        check_precision(trt, _router(trt.bfloat16))


def test_scan_exponential_in_half_precision_is_named():
    _, network = _network()
    x = network.add_input("x", trt.float16, (2, 4))
    exp = network.add_unary(x, trt.UnaryOperation.EXP)
    exp.name = "context.layers.0.mamba/Exp_169"
    network.mark_output(exp.get_output(0))
    with pytest.raises(NetworkError, match="Exp_169"):
        check_precision(trt, network)


def test_mamba_A_stored_in_half_precision_is_named():
    _, network = _network()
    a = network.add_constant((8,), trt.Weights(np.ones(8, dtype=np.float16)))
    a.name = "context_tower.layers.0.mixer.A"
    network.mark_output(a.get_output(0))
    with pytest.raises(NetworkError, match="mixer.A.*Mamba/router parameter"):
        check_precision(trt, network)


def test_parser_helper_layers_take_the_scope_they_sit_in():
    _, network = _network()
    x = network.add_input("x", trt.float32, (2, 2))
    names_in_order = ["denoiser.layers.2.attention/MatMul_5", "(Unnamed Layer* 7) [Unary]",
                      "ONNXTRT_castHelper_3", "context_tower.layers.0.norm.weight"]
    for name in names_in_order:
        layer = network.add_unary(x, trt.UnaryOperation.ABS)
        layer.name = name
        x = layer.get_output(0)
    network.mark_output(x)
    name_layers(network, "denoiser_step")
    name_layers(network, "denoiser_step")
    assert [network.get_layer(i).name for i in range(4)] == [
        "denoiser_step:denoiser.layers.2.attention/MatMul_5",
        "denoiser_step:denoiser.layers.2.attention/(Unnamed Layer* 7) [Unary]",
        "denoiser_step:denoiser.layers.2.attention/ONNXTRT_castHelper_3",
        "denoiser_step:context_tower.layers.0.norm.weight"]
