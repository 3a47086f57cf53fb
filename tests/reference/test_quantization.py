"""The quantisation arithmetic (reference/quantization.py) and the fake-quantised reference
(reference/quantized.py): codes, scales and rounding as ONNX's Q/DQ operators compute them,
which GEMMs each scope takes, AWQ's scale search, the calibration file."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from trt_twotower.config import preset
from trt_twotower.reference.quantization import (FP8_MAX, Calibration, LinearStats,
                                                 QuantizationError, QuantRecipe, awq_pre_scale,
                                                 dequantize_int4, fake_fp8, in_scope,
                                                 int4_block, quantize_fp8, quantize_int4,
                                                 quantize_weight)
from trt_twotower.reference.quantized import FakeQuantLinear, fake_quantize, rounding_nudge
from tests.conftest import random_model


def _run(nodes, initializers, inputs, output_shape, feeds):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fake_fp8_is_onnx_runtimes_quantize_dequantize_bit_for_bit(rng):
    """Saturation at ±448, round-to-nearest-even, x / scale in fp32: 0 mismatches over 65k
    values spanning E4M3's range, its subnormals and out-of-range values."""
    x = torch.randn(256, 256, generator=rng) * torch.logspace(-4, 3, 256)[:, None]
    x[0, :4] = torch.tensor([1e6, -1e6, 0.0, 1e-9])
    scale = torch.tensor(0.0137)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"],
                              output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    y = _run(nodes, [numpy_helper.from_array(scale.numpy(), "s")],
             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])], [256, 256],
             {"x": x.numpy()})
    ours = fake_fp8(x, scale)
    assert int((torch.from_numpy(y) != ours).sum()) == 0
    assert torch.isfinite(ours).all() and float(ours.abs().max()) == float(FP8_MAX * scale)


def test_int4_codes_and_blocked_scales_reconstruct_within_half_a_step(rng):
    w = torch.randn(24, 96, generator=rng)
    codes, scales = quantize_int4(w, 32, torch.float32)
    assert codes.dtype == torch.int8 and scales.shape == (24, 3)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    step = scales.repeat_interleave(32, 1)
    assert ((dequantize_int4(codes, scales) - w).abs() <= step / 2 + 1e-6).all()
    block_max = w.reshape(24, 3, 32).abs().amax(-1)
    assert torch.allclose(scales, block_max / 7)


def test_int4_rounds_half_to_even_and_gives_a_zero_block_scale_one():
    w = torch.tensor([[7.0, 2.5, 3.5, -2.5], [0.0, 0.0, 0.0, 0.0]])
    codes, scales = quantize_int4(w, 4, torch.float32)
    assert codes.tolist() == [[7, 2, 4, -2], [0, 0, 0, 0]] and scales.tolist() == [[1.0], [1.0]]


def test_int4_codes_are_taken_against_the_scale_as_stored(rng):
    """A bf16 graph stores bf16 scales: the codes must round against those, not the fp32
    scale, or the graph would compute another weight than the reference."""
    w = torch.randn(16, 64, generator=rng)
    codes, scales = quantize_int4(w, 64, torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    expected = torch.round(w / scales.float()).clamp(-8, 7)
    assert torch.equal(codes.float(), expected)


@pytest.mark.parametrize("width, block, expected", [(2688, 128, 128), (1856, 128, 64),
                                                    (3712, 128, 128), (48, 128, 16),
                                                    (96, 48, 48), (64, 48, 32)])
def test_int4_block_is_the_block_size_or_the_largest_power_of_two_dividing_the_width(width, block,
                                                                            expected):
    assert int4_block(width, block) == expected


def test_fp8_weights_have_one_scale_per_output_channel_and_never_overflow(rng):
    w = torch.randn(8, 64, generator=rng) * torch.logspace(-3, 3, 8)[:, None]
    codes, scales = quantize_fp8(w, torch.float32)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (8,)
    restored = codes.float() * scales[:, None]
    assert torch.isfinite(restored).all()
    assert ((restored - w).abs() <= w.abs() * 2 ** -4 + scales[:, None] * 2 ** -9).all()


def test_awq_beats_round_to_nearest_where_a_few_input_channels_dominate(rng):
    """AWQ's premise: scaling salient channels up before rounding lowers the output error.
    α = 0 is plain RTN, so the search can only do as well or better on its inputs."""
    w = torch.randn(64, 128, generator=rng)
    x = torch.randn(256, 128, generator=rng)
    x[:, :4] *= 30.0
    p = awq_pre_scale(w, x, 128)

    def error(pre):
        codes, scales = quantize_int4(w / pre, 128, torch.float32)
        return float(((x * pre) @ dequantize_int4(codes, scales).t() - x @ w.t()).square().mean())

    assert error(p) < 0.7 * error(torch.ones(128))
    assert float(p[:4].max()) < float(p[4:].min())        # salient channels: larger weights
    assert torch.equal(awq_pre_scale(w, x[:0], 128), torch.ones(128))


def test_scopes_take_their_gemms_and_never_the_router_or_attention_math():
    c = preset("tiny")               # "ME*M-E*M-E"
    names = {"moe expert": "context_tower.layers.1.mixer.experts.3.up_proj.weight",
             "shared expert": "denoiser_tower.layers.1.mixer.shared_experts.down_proj.weight",
             "mamba in_proj": "context_tower.layers.0.mixer.in_proj.weight",
             "attention q": "context_tower.layers.2.mixer.q_proj.weight",
             "dense mlp": "context_tower.layers.4.mixer.up_proj.weight"}
    never = ["context_tower.layers.1.mixer.gate.weight",
             "context_tower.layers.0.mixer.conv1d.weight",
             "context_tower.layers.0.mixer.norm.weight", "context_tower.layers.0.norm.weight",
             "context_lm_head.weight", "t_embedder.mlp.0.weight", "lm_head.weight"]
    taken = {scope: {k for k, n in names.items() if in_scope(n, c, scope)}
             for scope in ("experts", "experts+mamba", "all-gemms")}
    assert taken["experts"] == {"moe expert", "shared expert"}
    assert taken["experts+mamba"] == {"moe expert", "shared expert", "mamba in_proj"}
    assert taken["all-gemms"] == set(names)
    assert not any(in_scope(n, c, "all-gemms") for n in never)


def test_a_recipe_refuses_unknown_settings_and_missing_calibration(rng):
    with pytest.raises(QuantizationError, match="unknown quantisation"):
        QuantRecipe("int3")
    with pytest.raises(QuantizationError, match="scope"):
        QuantRecipe("fp8", "attention")
    with pytest.raises(QuantizationError, match="block size"):
        QuantRecipe("int4-rtn", block_size=0)
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_weight(torch.randn(4, 8, generator=rng), QuantRecipe("fp8"), None,
                        torch.float32)


def test_calibration_round_trips_and_a_corrupt_file_is_a_clear_error(tmp_path, rng):
    stats = {"a.weight": LinearStats(3.5, torch.rand(8, generator=rng)),
             "b.weight": LinearStats(0.25)}
    path = Calibration(stats, prompts=4, tokens=512).save(tmp_path / "q.safetensors")
    loaded = Calibration.load(path)
    assert (loaded.prompts, loaded.tokens) == (4, 512)
    assert loaded.stats["a.weight"].input_amax == 3.5
    assert torch.equal(loaded.stats["a.weight"].awq_pre_scale, stats["a.weight"].awq_pre_scale)
    assert loaded.stats["b.weight"].awq_pre_scale is None
    path.write_bytes(b"not safetensors")
    with pytest.raises(QuantizationError, match="cannot read the calibration"):
        Calibration.load(path)


def test_fake_quant_linear_computes_the_dequantised_gemm(rng):
    w, x = torch.randn(16, 32, generator=rng), torch.randn(5, 32, generator=rng)
    stats = LinearStats(float(x.abs().max()), torch.rand(32, generator=rng) + 0.5)
    for mode in ("fp8", "int4-awq", "int4-rtn"):
        q = quantize_weight(w, QuantRecipe(mode, block_size=16), stats, torch.float32)
        layer = FakeQuantLinear(q, None, torch.float32)
        x_in = x * q.pre_scale if q.pre_scale is not None else x
        if q.input_scale is not None:
            x_in = fake_fp8(x_in, q.input_scale)
        assert torch.allclose(layer(x), x_in @ q.dequantize().t(), rtol=1e-6, atol=1e-6)
        assert float((layer(x) - x @ w.t()).abs().max()) < 0.35 * float((x @ w.t()).abs().max())


def test_fake_quantize_replaces_exactly_the_scopes_linears():
    model = random_model(preset("tiny"), seed=3)
    before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    stats = {f"{n}.weight": LinearStats(1.0) for n in before}
    fake_quantize(model, QuantRecipe("fp8", "experts"), Calibration(stats, 1, 1))
    replaced = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert replaced and replaced == {n for n in before if "experts." in n}
    with rounding_nudge(model, 1e-3) as nudged:
        assert nudged == len(replaced)
    assert all(m.nudge == 0.0 for m in model.modules() if isinstance(m, FakeQuantLinear))
    untouched = random_model(preset("tiny"), seed=3)
    assert fake_quantize(untouched, QuantRecipe(), None) is untouched
    assert not any(isinstance(m, FakeQuantLinear) for m in untouched.modules())
