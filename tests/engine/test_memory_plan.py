"""The memory plan against independent counts: the reference towers' parameters, the exported
graphs' initializers, a per-layer count of the released dimensions, an allocated StepCache; and
its fit / refuse logic at the byte boundary."""

from __future__ import annotations

import math

import onnx
import pytest
import torch

from trt_twotower import names
from trt_twotower.config import ATTENTION, MAMBA, MOE, TwoTowerConfig, preset
from trt_twotower.engine.memory_plan import (BATCH_SEARCH_LIMIT, DENOISER_EXPERTS_TOUCHED,
                                             GIB, GPUS, EngineActivation, MemoryPlanError,
                                             activation_estimate, cache_bytes, check_fits,
                                             format_plan, format_traffic, largest_batch,
                                             largest_context, plan_memory,
                                             quantized_shapes, quantized_weight_bytes,
                                             reported_activation, step_traffic, weight_bytes)
from trt_twotower.export.convert import ConvertOptions, export_graph
from trt_twotower.export.quantize import calibrate
from trt_twotower.reference.quantization import QuantRecipe
from trt_twotower.runtime.cache import StepCache

SETTINGS = dict(dtype="bfloat16", max_batch=3, max_context=40, block_size=8, max_prefill=16)


def tiny_plan(**changes):
    return plan_memory(preset("tiny"), **{**SETTINGS, **changes})


def _module_bytes(modules) -> int:
    """Parameters and buffers (the router's score-correction bias is a buffer)."""
    return sum(t.numel() * t.element_size() for m in modules
               for t in (*m.parameters(), *m.buffers()))


def test_fp32_weights_equal_the_reference_towers_parameter_bytes(tiny_model):
    towers = {"context": [tiny_model.context_tower, tiny_model.context_lm_head],
              "denoiser": [tiny_model.denoiser_tower, tiny_model.lm_head,
                           tiny_model.t_embedder, tiny_model.t_block,
                           tiny_model.scale_shift_tables]}
    assert all(t.dtype == torch.float32 for t in tiny_model.state_dict().values())
    for tower, modules in towers.items():
        assert weight_bytes(tiny_model.config, tower, "float32")[0] == _module_bytes(modules)
    assert sum(_module_bytes(m) for m in towers.values()) == _module_bytes([tiny_model])


def _initializer_bytes(path) -> tuple[int, int]:
    """(all initializer bytes, the fp32 ones) as the exporter wrote them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    total = fp32 = 0
    for tensor in graph.initializer:
        length = int({e.key: e.value for e in tensor.external_data}["length"])
        total += length
        fp32 += length if tensor.data_type == onnx.TensorProto.FLOAT else 0
    return total, fp32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_equal_the_exported_graphs_initializers(tiny_model, tmp_path, dtype):
    """What the engine stores is what the exporter writes, fp32 pins included."""
    config = tiny_model.config
    options = ConvertOptions(dtype=dtype, max_context=32)
    for graph, tower in ((names.CONTEXT_STEP, "context"), (names.DENOISER_STEP, "denoiser")):
        path = export_graph(config, tiny_model.state_dict().__getitem__, tmp_path, graph, options)
        total, fp32 = _initializer_bytes(path)
        assert weight_bytes(config, tower, dtype) == (total, fp32)
        assert 0 < fp32 < total


def _layer_counts(c: TwoTowerConfig) -> tuple[int, int]:
    """(parameters, fp32-stored parameters) of one tower's layers, from the spec's shapes."""
    h, total, fp32 = c.hidden_size, 0, 0
    for kind in c.layer_types:
        total, fp32 = total + h, fp32 + h                                   # block norm
        if kind == MAMBA:
            heads = c.mamba_num_heads
            total += (c.in_proj_dim * h + c.conv_dim * c.conv_kernel + c.conv_dim + 3 * heads
                      + c.d_inner + h * c.d_inner)
            fp32 += 3 * heads + c.d_inner                                    # dt_bias, A_log, D
        elif kind == ATTENTION:
            total += 2 * h * c.num_attention_heads * c.head_dim \
                + 2 * h * c.num_key_value_heads * c.head_dim
        elif kind == MOE:
            e = c.n_routed_experts
            total += e * h + e + 2 * e * h * c.moe_intermediate_size \
                + 2 * h * c.moe_shared_expert_intermediate_size * c.n_shared_experts
            fp32 += e * h + e
        else:
            total += 2 * h * c.intermediate_size
    return total, fp32


@pytest.mark.parametrize("name", ["tiny", "nano-30b-a3b"])
def test_weights_equal_a_per_layer_count_of_the_config(name):
    c = preset(name)
    layers, layers_fp32 = _layer_counts(c)
    h = c.hidden_size
    context = layers + 2 * c.vocab_size * h + h                  # embeddings, head, norm_f
    time = 256 * h + h + h * h + h + 3 * h * h + 3 * h + c.num_hidden_layers * 3 * h
    fp32 = layers_fp32 + h
    for tower, params in (("context", context), ("denoiser", context + time)):
        assert weight_bytes(c, tower, "bfloat16") == ((params - fp32) * 2 + fp32 * 4, fp32 * 4)


def test_released_tower_is_58_8_gib_in_bf16():
    """The spec's derived figure (31.578B parameters per tower ≈ 58.8 GiB)."""
    nano = preset("nano-30b-a3b")
    assert weight_bytes(nano, "context", "bfloat16")[0] / GIB == pytest.approx(58.83, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_bytes_equal_an_allocated_step_cache(tiny_config, dtype):
    cache = StepCache.allocate(tiny_config, 3, 40, dtype)
    kv = sum(t.numel() * t.element_size() for n, t in cache.tensors.items()
             if n.startswith("past_"))
    mamba = sum(t.numel() * t.element_size() for n, t in cache.tensors.items()
                if not n.startswith("past_"))
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    assert cache_bytes(tiny_config, 3, 40, name) == (kv, mamba)
    plan = tiny_plan(dtype=name)
    for gpu in plan.gpus:                   # the context GPU's cache and the denoiser's mirror
        assert (gpu.kv_cache, gpu.mamba_state) == (kv, mamba)


def test_one_gpu_holds_both_towers_both_caches_and_one_reserve():
    two, one = tiny_plan(), tiny_plan(context_device=0, denoiser_device=0)
    assert len(one.gpus) == 1 and one.gpus[0].role == "GPU"
    assert [g.role for g in two.gpus] == ["context GPU", "denoiser GPU"]
    gpu = one.gpus[0]
    assert gpu.weights == sum(g.weights for g in two.gpus)
    assert gpu.kv_cache == 2 * two.gpus[0].kv_cache
    assert gpu.total == sum(g.total for g in two.gpus) - gpu.reserve


def test_builder_reported_activation_replaces_the_estimate():
    estimated = tiny_plan()
    plan = tiny_plan(activation_bytes={"context": 12345})
    context, denoiser = (g.towers[0] for g in plan.gpus)
    assert (context.activations, context.activations_reported) == (12345, True)
    assert denoiser == estimated.gpus[1].towers[0] and not denoiser.activations_reported
    assert denoiser.activations == activation_estimate(preset("tiny"), "denoiser", "bfloat16",
                                                       3, 40, 8, 16)


def test_reported_activation_sums_a_towers_engines_and_drops_unknown_towers():
    engines = [EngineActivation("context", 100), EngineActivation("denoiser", 10),
               EngineActivation("denoiser", 7)]
    assert reported_activation(engines) == {"context": 100, "denoiser": 17}
    engines.append(EngineActivation("denoiser", 0))              # a log without the figure
    assert reported_activation(engines) == {"context": 100}


def test_activation_estimate_grows_with_what_each_engine_reads():
    """Context: batch × max_prefill tokens (the MoE's every-expert working set dominates);
    denoiser: batch and the context it concatenates with its block."""
    nano = preset("nano-30b-a3b")
    base = dict(dtype="bfloat16", batch=4, max_context=1024, block_size=16, max_prefill=256)

    def grows(tower, **change):
        return activation_estimate(nano, tower, **{**base, **change}) > \
            activation_estimate(nano, tower, **base)

    assert grows("context", batch=8) and grows("context", max_prefill=512)
    assert grows("denoiser", batch=8) and grows("denoiser", max_context=131072)
    assert not grows("denoiser", max_prefill=512)


def test_check_fits_accepts_the_exact_total_and_refuses_one_byte_less():
    plan = tiny_plan()
    fullest = max(plan.gpus, key=lambda g: g.total)
    other = min(plan.gpus, key=lambda g: g.total)
    assert fullest.total > other.total
    check_fits(plan, fullest.total)
    with pytest.raises(MemoryPlanError) as err:
        check_fits(plan, fullest.total - 1, "the test GPU")
    message = str(err.value)
    assert f"the {fullest.role} (GPU {fullest.device}) needs" in message
    assert "the test GPU has" in message and "--max-batch to 2" in message


def test_check_fits_says_when_the_weights_alone_do_not_fit():
    plan = tiny_plan()
    gpu = plan.gpus[0]
    with pytest.raises(MemoryPlanError, match="weights and reserve alone"):
        check_fits(plan, gpu.weights + gpu.reserve - 1)


def test_largest_batch_is_exact_at_its_boundary_and_monotone():
    nano = plan_memory(preset("nano-30b-a3b"), "bfloat16", 4, 1024, 16, 256)
    memory = 80 * GIB
    previous = None
    for context in (1024, 8192, 32768, 131072):
        best = largest_batch(nano, memory, context)
        for device, batch in best.items():
            assert 0 < batch < BATCH_SEARCH_LIMIT
            fits = plan_memory(preset("nano-30b-a3b"), "bfloat16", batch, context, 16, 256)
            over = plan_memory(preset("nano-30b-a3b"), "bfloat16", batch + 1, context, 16, 256)
            gpu = {g.device: g for g in fits.gpus}[device]
            assert gpu.total <= memory < {g.device: g for g in over.gpus}[device].total
            if previous is not None:
                assert batch <= previous[device]
        previous = best
    more = largest_batch(nano, 140 * GIB, 8192)
    assert all(more[d] > b for d, b in largest_batch(nano, memory, 8192).items())


def test_largest_context_is_capped_by_the_model_and_zero_when_nothing_fits():
    plan = tiny_plan()
    assert set(largest_context(plan, 80 * GIB, 4).values()) == {4096}
    assert set(largest_context(plan, GIB, 4).values()) == {0}      # the reserve alone is 1 GiB


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        tiny_plan(max_batch=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        tiny_plan(dtype="int8")
    with pytest.raises(ValueError, match="GPU index"):
        tiny_plan(denoiser_device=-1)


def test_format_plan_shows_gib_with_two_decimals_and_the_headroom():
    plan = tiny_plan()
    memory = 2 * GIB
    table = format_plan(plan, memory, "test GPU").splitlines()
    assert table[0] == "| GiB | context GPU 0 | denoiser GPU 1 |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table[2:]}
    assert rows["**total**"] == [f"{g.total / GIB:.2f}" for g in plan.gpus]
    assert rows["test GPU memory"] == ["2.00", "2.00"]
    assert rows["headroom"] == [f"{(memory - g.total) / GIB:.2f}" for g in plan.gpus]
    assert "activations (estimate)" in rows
    assert math.isclose(sum(float(rows[k][0]) for k in ("weights", "KV cache", "Mamba state",
                                                          "activations (estimate)",
                                                          "runtime buffers",
                                                          "CUDA context reserve")),
                        float(rows["**total**"][0]), abs_tol=0.03)


# --- quantised builds (issue 19) ------------------------------------------------------------

QUANTIZED = [QuantRecipe("int4-awq", "all-gemms", 16), QuantRecipe("fp8", "experts+mamba"),
             QuantRecipe("int4-rtn", "experts", 128)]


@pytest.mark.parametrize("recipe", QUANTIZED, ids=lambda r: f"{r.mode}-{r.scope}")
def test_quantized_weights_equal_the_exported_graphs_initializers(tiny_model, tmp_path, recipe):
    """Codes (int4 two per byte), scales, AWQ pre-scales and fp8 input scales: the plan counts
    what the quantised exporter writes, to the byte."""
    config = tiny_model.config
    weights = tiny_model.state_dict().__getitem__
    windows = torch.randint(4, config.vocab_size, (4, 24), generator=torch.Generator()
                            .manual_seed(0))
    calibration = calibrate(config, weights, recipe, windows, block_size=8)
    options = ConvertOptions(dtype="bfloat16", max_context=32, quantization=recipe)
    for graph, tower in ((names.CONTEXT_STEP, "context"), (names.DENOISER_STEP, "denoiser")):
        path = export_graph(config, weights, tmp_path, graph, options, calibration=calibration)
        assert weight_bytes(config, tower, "bfloat16", recipe) == _initializer_bytes(path)
        assert weight_bytes(config, tower, "bfloat16", recipe)[0] < \
            weight_bytes(config, tower, "bfloat16")[0]


def test_released_experts_shrink_at_least_3_5x_in_int4_and_1_9x_in_fp8():
    nano = preset("nano-30b-a3b")
    shapes = quantized_shapes(nano, "experts")["context"]
    bf16 = sum(math.prod(s) * 2 for s in shapes)
    for recipe, ratio in ((QuantRecipe("int4-awq"), 3.5), (QuantRecipe("int4-rtn"), 3.5),
                          (QuantRecipe("fp8"), 1.9)):
        stored = sum(quantized_weight_bytes(s, recipe, 2) for s in shapes)
        assert bf16 / stored >= ratio, (recipe.mode, bf16 / stored)


def test_ar_step_reads_the_released_models_6_45_gb_of_bf16_weights():
    """Issue 19's figure: every weight but the embeddings, 6 of 128 routed experts per MoE
    layer; plus the KV cache read and the Mamba states read and written."""
    nano = preset("nano-30b-a3b")
    step = step_traffic(nano, "context", "bfloat16", None, 1, nano.num_experts_per_tok, 1024)
    assert step.weights / 1e9 == pytest.approx(6.45, abs=0.03)
    h, moe = nano.hidden_size, nano.layer_types.count("E")
    expert = 2 * h * nano.moe_intermediate_size * 2
    everything = weight_bytes(nano, "context", "bfloat16")[0]
    assert step.weights == everything - (nano.vocab_size - 1) * h * 2 \
        - moe * (nano.n_routed_experts - 6) * expert
    kv, mamba = cache_bytes(nano, 1, 1024, "bfloat16")
    assert step.caches == kv + 2 * mamba
    assert step.floor_seconds(GPUS["h100-80gb"]) == step.total / 3.35e12


def test_denoiser_steps_read_more_experts_and_quantisation_reads_fewer_bytes():
    nano = preset("nano-30b-a3b")
    low, high = (step_traffic(nano, "denoiser", "bfloat16", None, 16, n, 1024)
                 for n in DENOISER_EXPERTS_TOUCHED)
    expert = 2 * nano.hidden_size * nano.moe_intermediate_size * 2
    assert high.weights - low.weights == nano.layer_types.count("E") * 28 * expert
    int4 = step_traffic(nano, "denoiser", "bfloat16", QuantRecipe("int4-rtn"), 16, 41, 1024)
    assert low.weights / int4.weights > 2.5 and int4.caches == low.caches


def test_traffic_table_has_a_row_per_mode_with_its_floors():
    table = format_traffic(preset("nano-30b-a3b"), "bfloat16", "experts", 128, 1024)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["none (bfloat16)", "fp8", "int4-awq", "int4-rtn"]
    ar_bytes, ar_h100, ar_h200 = (float(rows[0][i]) for i in (3, 5, 6))
    assert ar_h100 == pytest.approx(ar_bytes / 3.35, abs=0.01)
    assert ar_h200 == pytest.approx(ar_bytes / 4.8, abs=0.01)
    assert [float(r[3]) for r in rows[1:]] < [ar_bytes] * 3
