"""Real TensorRT-RTX builds of both towers on a CPU, the manifest they leave, and inspect."""

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from trt_twotower import names

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
from trt_twotower.cli import main
from trt_twotower.config import TwoTowerConfig
from trt_twotower.engine.build import BuildError, BuildOptions, build_engine, build_engines
from trt_twotower.engine.build_log import read_summary
from trt_twotower.engine.flavor import Flavor
from trt_twotower.engine.manifest import ManifestError, validate_engines
from trt_twotower.export.convert import ConvertOptions, convert
from trt_twotower.reference.sources import open_source


def test_every_graph_of_both_towers_builds_in_bf16(bf16_cli):
    bf16_build, output = bf16_cli
    assert "TensorRT flavour: tensorrt-rtx 1." in output
    manifest = validate_engines(bf16_build)
    assert set(manifest["engines"]) == set(names.GRAPHS)
    for graph, engine in manifest["engines"].items():
        assert (bf16_build / engine["file"]).stat().st_size == engine["bytes"] > 100_000
        assert engine["flavor"] == "tensorrt-rtx" and engine["passes"]["fp32_layers_checked"] > 0
    assert manifest["engines"][names.CONTEXT_STEP]["device"] == 0
    assert manifest["engines"][names.DENOISER_STEP]["device"] == 1


def test_both_towers_build_in_fp16(tmp_path):
    source = open_source(None, "tiny")
    state = source.model.state_dict()
    convert(source.config, state.__getitem__, tmp_path,
            ConvertOptions(dtype="float16", max_context=64,
                           graphs=(names.CONTEXT_STEP, names.DENOISER_UNMASK_STEP)),
            source.tokenizer, source.name, progress=False)
    manifest = build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx", block_size=8,
                                                    max_batch=2, max_prefill=32))
    assert set(manifest["engines"]) == {names.CONTEXT_STEP, names.DENOISER_UNMASK_STEP}
    assert manifest["dtype"] == "float16"


def test_manifest_io_and_profiles_agree_with_the_graphs(bf16_build):
    manifest = validate_engines(bf16_build)
    config = TwoTowerConfig.from_dict(manifest["config"])
    for graph, engine in manifest["engines"].items():
        model = onnx.load(str(bf16_build / f"{graph}.onnx"), load_external_data=False)
        assert [i["name"] for i in engine["inputs"]] == [i.name for i in model.graph.input]
        assert {o["name"] for o in engine["outputs"]} == {o.name for o in model.graph.output}
        inputs, _ = names.graph_io(config, manifest["max_context"], graph)
        assert [i["name"] for i in engine["inputs"]] == [s.name for s in inputs]
    context = manifest["engines"][names.CONTEXT_STEP]["profiles"]
    assert list(context) == ["decode", "block", "prefill"]
    assert context["decode"]["input_ids"] == [[1, 1], [2, 1], [2, 1]]
    assert context["block"]["input_ids"][2] == [2, 8]
    assert context["prefill"]["input_ids"][2] == [2, 64]


def test_engines_as_compiled_agree_with_the_graph_io(bf16_build):
    """The builder's own report of each engine's I/O (its DETAILED log) holds the names,
    dtypes and per-profile shapes of names.graph_io and of the manifest."""
    manifest = validate_engines(bf16_build)
    config = TwoTowerConfig.from_dict(manifest["config"])
    for graph, engine in manifest["engines"].items():
        summary = read_summary(bf16_build / engine["build_summary"])
        compiled = {t["name"]: t for t in summary["io"]}
        declared = engine["inputs"] + engine["outputs"]
        inputs, outputs = names.graph_io(config, manifest["max_context"], graph)
        assert [t["name"] for t in summary["io"] if t["mode"] == "input"] == \
            [s.name for s in inputs]
        assert {t["name"] for t in summary["io"] if t["mode"] == "output"} == \
            {s.name for s in outputs}
        for t in declared:
            assert compiled[t["name"]]["dtype"] == t["dtype"], (graph, t["name"])
        for t in engine["inputs"]:
            ranges = [[list(r) for r in p[t["name"]]] for p in engine["profiles"].values()
                      if t["name"] in p]
            assert compiled[t["name"]]["profiles"] == ranges or not ranges, (graph, t["name"])
        assert summary["engine_layers"] > 0 and summary["weights_bytes"] > 0
    context = read_summary(bf16_build / "context_step.summary.json")
    assert context["fused_attention"], "bf16 attention should map to a fused MHA kernel"


def _copy(build: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(build, out)
    return out


def test_tampered_engine_is_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    engine = out / "denoiser_step.engine"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="digest"):
        validate_engines(out)


def test_missing_engine_is_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    (out / "mock_ar_step.engine").unlink()
    with pytest.raises(ManifestError, match="mock_ar_step.engine .* is missing"):
        validate_engines(out)


def test_flavor_and_version_mismatches_are_refused(bf16_build):
    with pytest.raises(ManifestError, match="--flavor tensorrt"):
        validate_engines(bf16_build, flavor_name="tensorrt")
    with pytest.raises(ManifestError, match="only load in the version"):
        validate_engines(bf16_build, flavor_name="tensorrt-rtx", flavor_version="0.0.1")


def test_changed_config_is_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    raw = json.loads((out / "config.json").read_text())
    raw["layer_norm_epsilon"] = 1e-3
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="differs"):
        validate_engines(out)


def test_unreadable_timing_cache_is_a_clear_error(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    cache = tmp_path / "timing.cache"
    cache.mkdir()  # exists but cannot be read as a file
    with pytest.raises(BuildError, match="cannot read the timing cache"):
        build_engines(out, BuildOptions(flavor="tensorrt-rtx", timing_cache=cache,
                                        graphs=(names.MOCK_AR_STEP,)))


def test_corrupt_timing_cache_is_a_clear_error(bf16_build, tmp_path):
    """Full TensorRT's path (TensorRT-RTX ignores timing caches), through the RTX module's
    identical builder API, which rejects the bytes the same way."""
    import tensorrt_rtx

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache" * 8)
    manifest = validate_engines(bf16_build)
    with pytest.raises(BuildError, match="timing cache .* is corrupt"):
        build_engine(Flavor("tensorrt", tensorrt_rtx), bf16_build / "mock_ar_step.onnx",
                     names.MOCK_AR_STEP, TwoTowerConfig.from_dict(manifest["config"]),
                     manifest["max_context"], BuildOptions(timing_cache=cache))


def test_unknown_compute_capability_is_named(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    with pytest.raises(BuildError, match="SM999"):
        build_engines(out, BuildOptions(flavor="tensorrt-rtx", compute_capabilities=("SM999",),
                                        graphs=(names.MOCK_AR_STEP,)))


def test_engine_records_of_another_version_are_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    raw = json.loads((out / "manifest.json").read_text())
    raw["build"]["record_version"] = 0
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="rebuild"):
        validate_engines(out)


def test_plugin_lowering_on_tensorrt_rtx_needs_the_explicit_opt_in(tmp_path):
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(lowering="plugin", dtype="bfloat16", max_context=32,
                           graphs=(names.MOCK_AR_STEP,)),
            source.tokenizer, source.name, progress=False)
    with pytest.raises(BuildError, match="--allow-rtx-plugins"):
        build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx"))


def test_graphs_without_engines_are_not_an_engine_build(tmp_path):
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(max_context=32, graphs=(names.MOCK_AR_STEP,)), source.tokenizer,
            source.name, progress=False)
    with pytest.raises(ManifestError, match="no engines"):
        validate_engines(tmp_path)


def test_inspect_shows_engines_io_and_says_why_it_cannot_deserialise(bf16_build):
    result = CliRunner().invoke(main, ["inspect", str(bf16_build)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for graph in names.GRAPHS:
        assert f"{graph}: {graph}.engine" in result.output
    assert "input_ids" in result.output and "1..2x1..64" in result.output
    assert "cannot be deserialised" in result.output


def test_opted_in_plugin_lowering_builds_on_tensorrt_rtx_in_a_child_process(tmp_path):
    """The parser's private plugin path aborts a process that lacks libtensorrt_rtx.so; the
    opted-in build runs where that name resolves, so this process survives and gets an engine."""
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(lowering="plugin", dtype="bfloat16", max_context=32,
                           graphs=(names.MOCK_AR_STEP,)),
            source.tokenizer, source.name, progress=False)
    manifest = build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx", block_size=8,
                                                    max_batch=2, allow_rtx_plugins=True))
    engine = manifest["engines"][names.MOCK_AR_STEP]
    assert (tmp_path / engine["file"]).stat().st_size == engine["bytes"] > 100_000
    assert manifest["lowering"] == "plugin"
