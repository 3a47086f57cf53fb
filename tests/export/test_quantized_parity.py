"""Quantised graphs of the built-in model (`convert --quantize`), run by ONNX Runtime, against
the reference fake-quantised alike (``runtime.backends.quantized_like``): int4 within the fp32
tolerance (1e-4 relative) and greedy tokens identical in every mode; fp8 held to the same
tolerance except where an activation sits on an E4M3 rounding boundary (see
``test_fp8_graphs_match_the_quantised_reference``). Also: the graphs carry standard Q/DQ, and
quantised experts are ≥ 3.5× (int4) and ≥ 1.9× (fp8) smaller on disk than bf16."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from trt_twotower import names
from trt_twotower.cli import main
from trt_twotower.export.convert import ConvertOptions, convert, export_graph
from trt_twotower.export.moe import ExportError
from trt_twotower.export.quantize import calibrate
from trt_twotower.manifest import Manifest, ManifestError
from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.quantization import QuantRecipe
from trt_twotower.reference.quantized import rounding_nudge
from trt_twotower.reference.sources import open_source
from trt_twotower.runtime import backends
from trt_twotower.runtime.parity import (Backend, compare_generation, compare_steps,
                                         format_table, run_steps)
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor
from trt_twotower.train.corpus import token_stream

MAX_CONTEXT, BLOCK = 96, 16
TOLERANCE = 1e-4
FLIP_NUDGE = 2.0 ** -20      # a few fp32 ulps: more than ONNX Runtime and torch differ by
PROMPTS = [[5, 6, 7, 8, 9], [11], [40] * 3]


def _convert(out, *options):
    result = CliRunner().invoke(main, ["convert", "--quiet", "--max-context", str(MAX_CONTEXT),
                                       "--calibration-prompts", "16", "-o", str(out), *options],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


BUILDS = {"int4-awq": ("all-gemms", "64"), "int4-rtn": ("experts", "128"),
          "fp8": ("experts", "128")}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Each mode converted once: int4-awq of every GEMM in two blocks per row, int4-rtn of the
    experts in one, fp8 of the experts (`convert --quantize fp8`'s default scope)."""
    return {mode: (scope, _convert(tmp_path_factory.mktemp(mode), "--quantize", mode,
                                   "--quantize-scope", scope, "--quantize-block-size", block))
            for mode, (scope, block) in BUILDS.items()}


def _relative(candidate, reference) -> float:
    """max |a − b| / max |b|: the fp32 parity statistic."""
    return float((candidate - reference).abs().max() / reference.abs().max())


def _pair(out):
    candidate = backends.open_onnxruntime(out)
    reference = backends.quantized_like(open_source(), out)
    model = reference.model
    return (Backend(TorchContextExecutor(model), TorchDenoiserExecutor(model)),
            Backend(candidate.context, candidate.denoiser), model)


def _generations(ref, cand, config):
    settings = [GenerationSettings(mode=m, max_new_tokens=32, block_size=BLOCK,
                                   steps_per_block=BLOCK, stop_at_eos=False)
                for m in ("diffusion", "mock-ar", "ar")]
    return compare_generation(ref, cand, config, MAX_CONTEXT, PROMPTS, settings,
                              fused_unmask=True)


@pytest.mark.parametrize("mode", BUILDS)
def test_quantised_graphs_carry_standard_qdq(builds, mode):
    scope, out = builds[mode]
    onnx.checker.check_model(str(out / f"{names.CONTEXT_STEP}.onnx"), full_check=True)
    graph = onnx.load(str(out / f"{names.DENOISER_STEP}.onnx"), load_external_data=False).graph
    init = {t.name: t.data_type for t in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init]
    codes = _code_dtype(mode)
    assert dq and all(init[n.input[0]] == codes for n in dq)
    assert not any(".gate." in n.input[0] for n in dq)                # the router stays fp32
    stacked = [n for n in dq if n.input[0].endswith(("experts.up_proj", "experts.down_proj"))]
    assert len(stacked) == 2 * open_source().config.layer_types.count("E")
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert (len(quantize) == len(dq)) if mode == "fp8" else not quantize
    attention_q = any(".q_proj." in n.input[0] for n in dq)
    assert attention_q == (scope == "all-gemms")


def _code_dtype(mode: str) -> int:
    return onnx.TensorProto.FLOAT8E4M3FN if mode == "fp8" else onnx.TensorProto.INT4


@pytest.mark.parametrize("mode", ["int4-awq", "int4-rtn"])
def test_int4_graphs_match_the_quantised_reference_like_fp32_graphs(builds, mode):
    ref, cand, model = _pair(builds[mode][1])
    rows = compare_steps(ref, cand, model.config, MAX_CONTEXT, BLOCK, tolerance=TOLERANCE)
    assert all(r.passed for r in rows), format_table(rows)
    gens = _generations(ref, cand, model.config)
    assert all(g.passed for g in gens), format_table([], gens)


def test_fp8_graphs_match_the_quantised_reference(builds):
    """Two fp32 executors differ in an activation's last bits; where one lies within those
    bits of an E4M3 rounding boundary, they round it to neighbouring codes and the logits move
    by up to ~2e-2 (one code of one activation). The reference measures that itself: nudged by
    ±2⁻²⁰ before rounding, on the same inputs, its logits move by as much on the steps where
    it flips. So: every step within 1e-4, or within twice the change the nudged reference shows
    on that same step; a step the nudge leaves alone is held to 1e-4 (a wrong scale or layout
    moves every step of its tower, these too). How many steps flip depends on the CPU's
    kernels: on an AVX-512/AMX machine 6 of 11 steps did, each by exactly its nudged change.
    Greedy tokens: identical in every mode on these prompts; a flip can change a greedy token
    where the top two logits nearly tie."""
    ref, cand, model = _pair(builds["fp8"][1])
    steps, _ = run_steps([ref, cand], model.config, MAX_CONTEXT, BLOCK)
    nudged = []
    for sign in (1.0, -1.0):
        with rounding_nudge(model, sign * FLIP_NUDGE):
            nudged.append(run_steps([ref], model.config, MAX_CONTEXT, BLOCK)[0])
    errors = [_relative(step.logits[1], step.logits[0]) for step in steps]
    drifts = [max(_relative(n[i].logits[0], step.logits[0]) for n in nudged)
              for i, step in enumerate(steps)]
    bounds = [max(TOLERANCE, 2 * d) for d in drifts]
    table = "\n".join(f"{s.step:36} {e:.2e} (nudged reference {d:.2e}, bound {b:.2e})"
                      for s, e, d, b in zip(steps, errors, drifts, bounds))
    assert all(e <= b for e, b in zip(errors, bounds)), table
    assert max(drifts) > 0, "the nudge flipped nothing: it measures no rounding sensitivity"
    gens = _generations(ref, cand, model.config)
    assert all(g.passed for g in gens), format_table([], gens)


@pytest.mark.parametrize("mode", BUILDS)
def test_parity_is_not_reached_against_the_unquantised_reference(builds, mode):
    """Like with like matters: the same graphs are far from the plain reference."""
    out = builds[mode][1]
    plain = open_source().model
    candidate = backends.open_onnxruntime(out)
    rows = compare_steps(Backend(TorchContextExecutor(plain), TorchDenoiserExecutor(plain)),
                         Backend(candidate.context, candidate.denoiser), plain.config,
                         MAX_CONTEXT, BLOCK, prefill_lengths=(7,), tolerance=TOLERANCE)
    assert max(r.max_rel for r in rows[:-1]) > 100 * TOLERANCE


def _expert_bytes(path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(int({e.key: e.value for e in t.external_data}["length"])
               for t in graph.initializer if "experts." in t.name)


def test_quantised_experts_are_smaller_on_disk_than_bf16(tmp_path):
    """Every byte of the routed and shared experts as exported (codes, scales, pre-scales,
    input scales), bf16 graphs of the built-in model."""
    source = open_source()
    weights = source.model.state_dict().__getitem__
    windows = token_stream(source.tokenizer, "heldout", max_tokens=8 * 128).reshape(8, 128)
    sizes = {}
    for mode in ("none", "int4-awq", "fp8"):
        recipe = QuantRecipe(mode)
        calibration = (calibrate(source.config, weights, recipe, windows)
                       if recipe.needs_calibration else None)
        out = tmp_path / mode
        out.mkdir()
        path = export_graph(source.config, weights, out, names.CONTEXT_STEP,
                            ConvertOptions(dtype="bfloat16", max_context=32,
                                           quantization=recipe), calibration=calibration)
        sizes[mode] = _expert_bytes(path)
    assert sizes["none"] / sizes["int4-awq"] >= 3.5, sizes
    assert sizes["none"] / sizes["fp8"] >= 1.9, sizes


def test_a_calibrated_mode_without_prompts_is_refused(tmp_path):
    source = open_source()
    with pytest.raises(ExportError, match="calibrates on prompts"):
        convert(source.config, source.model.state_dict().__getitem__, tmp_path,
                ConvertOptions(quantization=QuantRecipe("fp8")), source.tokenizer, "builtin",
                progress=False)


def test_the_manifest_records_the_quantisation_and_guards_its_calibration(builds, tmp_path):
    scope, out = builds["int4-awq"]
    record = Manifest.load(out).quantization
    assert (record.mode, record.scope, record.block_size) == ("int4-awq", scope, 64)
    assert record.calibration_file == "quantization.safetensors"
    assert (record.calibration_prompts, record.calibration_tokens) == (16, 16 * 128)
    assert Manifest.load(builds["int4-rtn"][1]).quantization.calibration_file is None
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / record.calibration_file).write_bytes(b"\0" * 64)
    with pytest.raises(ManifestError, match="not the calibration this build was quantised"):
        backends.quantized_like(open_source(), copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["quantization"]                                 # a manifest from before issue 19
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(copy).quantization is None
