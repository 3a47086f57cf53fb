"""Real TensorRT-RTX builds of both towers on a CPU, the manifest they leave, and inspect."""

import contextlib
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from trt_twotower import names

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
from trt_twotower.cli import main
from trt_twotower.engine.build import (BuildError, BuildOptions, build_engine, build_engines,
                                       on_device)
from trt_twotower.engine.build_log import read_summary
from trt_twotower.engine.flavor import Flavor
from trt_twotower.engine.plugin_library import find_plugin_library
from tests.conftest import needs_plugin_library
from trt_twotower.engine.verify import verify_engines
from trt_twotower.export.convert import ConvertOptions, convert
from trt_twotower.manifest import Manifest, ManifestError, sha256_file
from trt_twotower.reference.sources import open_source


def _verified(build: Path, **flavor) -> Manifest:
    manifest = Manifest.load(build)
    verify_engines(build, manifest, **flavor)
    return manifest


def test_one_engine_per_tower_builds_in_bf16_on_its_device(bf16_cli):
    bf16_build, output = bf16_cli
    assert "TensorRT flavour: tensorrt-rtx 1." in output
    manifest = _verified(bf16_build)
    assert set(manifest.engines) == set(names.GRAPHS) == {names.CONTEXT_STEP, names.DENOISER_STEP}
    assert sorted(e.tower for e in manifest.engines.values()) == ["context", "denoiser"]
    for engine in manifest.engines.values():
        assert (bf16_build / engine.file).stat().st_size == engine.bytes > 100_000
        assert engine.flavor == "tensorrt-rtx" and engine.passes["fp32_layers_checked"] > 0
    assert manifest.engine_of("context").device == 0
    assert manifest.engine_of("denoiser").device == 1
    assert not list(bf16_build.glob("mock_ar_step*")) and not list(bf16_build.glob("*unmask*"))


def test_both_towers_build_in_fp16(tmp_path):
    source = open_source(None, "tiny")
    state = source.model.state_dict()
    convert(source.config, state.__getitem__, tmp_path,
            ConvertOptions(dtype="float16", max_context=64), source.tokenizer, source.name,
            progress=False)
    manifest = build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx", block_size=8,
                                                    max_batch=2, max_prefill=32))
    assert set(manifest.engines) == set(names.GRAPHS)
    assert manifest.dtype == "float16" and Manifest.load(tmp_path) == manifest


def test_manifest_io_and_profiles_agree_with_the_graphs(bf16_build):
    manifest = _verified(bf16_build)
    for graph, engine in manifest.engines.items():
        model = onnx.load(str(bf16_build / f"{graph}.onnx"), load_external_data=False)
        assert [i.name for i in engine.inputs] == [i.name for i in model.graph.input]
        assert {o.name for o in engine.outputs} == {o.name for o in model.graph.output}
        inputs, _ = names.graph_io(manifest.config, manifest.max_context, graph)
        assert [i.name for i in engine.inputs] == [s.name for s in inputs]
    context = manifest.engine_of("context").profiles
    assert list(context) == ["decode", "block", "prefill"]
    assert context["decode"]["input_ids"] == ((1, 1), (2, 1), (2, 1))
    assert context["block"]["input_ids"][2] == (2, 8)
    assert context["prefill"]["input_ids"][2] == (2, 64)
    denoiser = manifest.engine_of("denoiser").profiles
    assert list(denoiser) == ["block", "mock-ar"]
    assert denoiser["block"]["block_ids"] == ((1, 8), (2, 8), (2, 8))
    assert denoiser["mock-ar"]["block_ids"] == ((1, 1), (2, 1), (2, 1))


def test_engines_as_compiled_agree_with_the_graph_io(bf16_build):
    """The builder's own report of each engine's I/O (its DETAILED log) holds the names,
    dtypes and per-profile shapes of names.graph_io and of the manifest."""
    manifest = _verified(bf16_build)
    for graph, engine in manifest.engines.items():
        summary = read_summary(bf16_build / engine.build_summary)
        compiled = {t["name"]: t for t in summary["io"]}
        inputs, outputs = names.graph_io(manifest.config, manifest.max_context, graph)
        assert [t["name"] for t in summary["io"] if t["mode"] == "input"] == \
            [s.name for s in inputs]
        assert {t["name"] for t in summary["io"] if t["mode"] == "output"} == \
            {s.name for s in outputs}
        for t in engine.inputs + engine.outputs:
            assert compiled[t.name]["dtype"] == t.dtype, (graph, t.name)
        for t in engine.inputs:
            ranges = [[list(r) for r in p[t.name]] for p in engine.profiles.values()
                      if t.name in p]
            assert compiled[t.name]["profiles"] == ranges or not ranges, (graph, t.name)
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
        _verified(out)


def test_missing_engine_is_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    (out / "denoiser_step.engine").unlink()
    with pytest.raises(ManifestError,
                       match="denoiser_step.engine of the denoiser tower is missing"):
        _verified(out)


def test_flavor_and_version_mismatches_are_refused(bf16_build):
    with pytest.raises(ManifestError, match="--flavor tensorrt"):
        _verified(bf16_build, flavor_name="tensorrt")
    with pytest.raises(ManifestError, match="only load in the version"):
        _verified(bf16_build, flavor_name="tensorrt-rtx", flavor_version="0.0.1")


def test_changed_config_is_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    raw = json.loads((out / "config.json").read_text())
    raw["layer_norm_epsilon"] = 1e-3
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="differs"):
        _verified(out)


def test_unreadable_timing_cache_is_a_clear_error(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    cache = tmp_path / "timing.cache"
    cache.mkdir()  # exists but cannot be read as a file
    with pytest.raises(BuildError, match="cannot read the timing cache"):
        build_engines(out, BuildOptions(flavor="tensorrt-rtx", timing_cache=cache,
                                        graphs=(names.DENOISER_STEP,)))


class _RecordedDevices:
    """Stands in for torch.cuda's device selection on this GPU-less machine."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.entered: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "device", self.device)

    @contextlib.contextmanager
    def device(self, index):
        self.entered.append(index)
        yield


def test_full_tensorrt_builds_on_the_engines_own_gpu(monkeypatch):
    import tensorrt_rtx

    devices = _RecordedDevices(monkeypatch, count=2)
    with on_device(Flavor("tensorrt", tensorrt_rtx), 1):
        assert devices.entered == [1]
    with pytest.raises(BuildError, match="GPU 2 is not on this host \\(it has 2\\)"):
        with on_device(Flavor("tensorrt", tensorrt_rtx), 2):
            pass
    with on_device(Flavor("tensorrt-rtx", tensorrt_rtx), 7):
        assert devices.entered == [1], "TensorRT-RTX builds for compute capabilities, not a GPU"


def test_each_tower_is_built_on_its_own_device(bf16_build, tmp_path, monkeypatch):
    from trt_twotower.engine import build

    out = _copy(bf16_build, tmp_path)
    seen = []

    @contextlib.contextmanager
    def recorded(flavor, device):
        seen.append(device)
        yield
    monkeypatch.setattr(build, "on_device", recorded)
    manifest = build_engines(out, BuildOptions(flavor="tensorrt-rtx", context_device=3,
                                               denoiser_device=5, block_size=8, max_batch=2,
                                               max_prefill=16, graphs=(names.DENOISER_STEP,)))
    assert seen == [5] and manifest.engine_of("denoiser").device == 5


def test_corrupt_timing_cache_is_a_clear_error(bf16_build, tmp_path, monkeypatch):
    """Full TensorRT's path (TensorRT-RTX ignores timing caches), through the RTX module's
    identical builder API, which rejects the bytes the same way."""
    import tensorrt_rtx

    _RecordedDevices(monkeypatch, count=1)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache" * 8)
    manifest = Manifest.load(bf16_build)
    with pytest.raises(BuildError, match="timing cache .* is corrupt"):
        build_engine(Flavor("tensorrt", tensorrt_rtx), bf16_build / "denoiser_step.onnx",
                     names.DENOISER_STEP, manifest.config, manifest.max_context,
                     BuildOptions(timing_cache=cache), tmp_path / "x.engine")


def test_unknown_compute_capability_is_named(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    with pytest.raises(BuildError, match="SM999"):
        build_engines(out, BuildOptions(flavor="tensorrt-rtx", compute_capabilities=("SM999",),
                                        graphs=(names.DENOISER_STEP,)))


def test_engine_records_of_another_version_are_refused(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    raw = json.loads((out / "manifest.json").read_text())
    raw["build"]["record_version"] = 0
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="rebuild"):
        Manifest.load(out)


def test_plugin_lowering_on_tensorrt_rtx_needs_the_explicit_opt_in(tmp_path):
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(lowering="plugin", dtype="bfloat16", max_context=32,
                           graphs=(names.DENOISER_STEP,)),
            source.tokenizer, source.name, progress=False)
    with pytest.raises(BuildError, match="--allow-rtx-plugins"):
        build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx"))


def test_graphs_without_engines_are_not_an_engine_build(tmp_path):
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(max_context=32, graphs=(names.DENOISER_STEP,)), source.tokenizer,
            source.name, progress=False)
    with pytest.raises(ManifestError, match="no engines"):
        _verified(tmp_path)


def test_inspect_shows_engines_io_and_says_why_it_cannot_deserialise(bf16_build):
    result = CliRunner().invoke(main, ["inspect", str(bf16_build)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for graph, tower in names.TOWER_OF_GRAPH.items():
        assert f"{graph}: {graph}.engine" in result.output
        assert f"for the {tower} tower" in result.output
    assert "input_ids" in result.output and "1..2x1..64" in result.output
    assert "cannot be deserialised" in result.output


def _plugin_graph(out: Path) -> Path:
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, out,
            ConvertOptions(lowering="plugin", dtype="bfloat16", max_context=32,
                           graphs=(names.DENOISER_STEP,)),
            source.tokenizer, source.name, progress=False)
    return out


def test_a_plugin_build_without_the_plugin_library_is_refused(tmp_path, monkeypatch):
    """An engine with plugin nodes is useless without the library it was built against: the
    build refuses to write one that records no library digest."""
    monkeypatch.setenv("TWOTOWER_PLUGIN_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(BuildError, match=r"no plugin library at .*missing.so"):
        build_engines(_plugin_graph(tmp_path / "g"),
                      BuildOptions(flavor="tensorrt-rtx", allow_rtx_plugins=True))
    assert not (tmp_path / "g" / "denoiser_step.engine").exists()


@needs_plugin_library
def test_shapes_the_plugin_kernels_cannot_run_are_refused_before_building(tmp_path):
    graphs = _plugin_graph(tmp_path / "g")
    with pytest.raises(BuildError, match="block size 2048"):
        build_engines(graphs, BuildOptions(flavor="tensorrt-rtx", allow_rtx_plugins=True,
                                           block_size=2048))
    assert not (graphs / "denoiser_step.engine").exists()


@needs_plugin_library
def test_opted_in_plugin_lowering_builds_on_tensorrt_rtx_in_a_child_process(tmp_path):
    """The parser's private plugin path aborts a process that lacks libtensorrt_rtx.so; the
    opted-in build runs where that name resolves, so this process survives and gets an engine."""
    source = open_source(None, "tiny")
    convert(source.config, source.model.state_dict().__getitem__, tmp_path,
            ConvertOptions(lowering="plugin", dtype="bfloat16", max_context=32,
                           graphs=(names.DENOISER_STEP,)),
            source.tokenizer, source.name, progress=False)
    manifest = build_engines(tmp_path, BuildOptions(flavor="tensorrt-rtx", block_size=8,
                                                    max_batch=2, allow_rtx_plugins=True))
    engine = manifest.engine_of("denoiser")
    assert (tmp_path / engine.file).stat().st_size == engine.bytes > 100_000
    assert manifest.lowering == "plugin"
    assert engine.plugin_library_sha256 == sha256_file(find_plugin_library())


def test_a_graph_changed_after_convert_is_not_built(bf16_build, tmp_path):
    out = _copy(bf16_build, tmp_path)
    data = out / "denoiser_step.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="denoiser_step.onnx.data does not match"):
        build_engines(out, BuildOptions(flavor="tensorrt-rtx", graphs=(names.DENOISER_STEP,)))
