"""The typed manifest: what convert writes loads back equal, and a manifest that is malformed,
of another schema, or that points outside its directory is refused naming the field."""

import json

import pytest

from trt_twotower.config import preset
from trt_twotower.export.convert import ConvertOptions, convert
from trt_twotower.manifest import MANIFEST_SCHEMA, Manifest, ManifestError
from trt_twotower.reference.sources import open_source


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    source = open_source(None, "tiny")
    written = convert(source.config, source.model.state_dict().__getitem__, out,
                      ConvertOptions(max_context=32), source.tokenizer, source.name,
                      progress=False)
    return out, written


def _rewrite(out, tmp_path, change):
    raw = json.loads((out / "manifest.json").read_text())
    change(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    return tmp_path


def test_what_convert_writes_loads_back_equal(converted):
    out, written = converted
    loaded = Manifest.load(out)
    assert loaded == written
    assert loaded.config == preset("tiny") and loaded.stage == "graphs"
    assert {g.tower for g in loaded.graphs.values()} == {"context", "denoiser"}
    assert loaded.graphs["denoiser_step"].inputs[2].name == "modulated"
    assert loaded.graphs["denoiser_step"].inputs[2].dtype == "bool"


@pytest.mark.parametrize("field, value, message", [
    ("file", "../../../../etc/passwd", "not a file name inside the build directory"),
    ("file", "/etc/passwd", "not a file name inside the build directory"),
    ("data_file", "..", "not a file name inside the build directory"),
    ("bytes", "12", "field 'bytes' is str, expected int"),
    ("bytes", True, "field 'bytes' is bool, expected int"),
    ("tower", None, "field 'tower' is NoneType, expected str"),
])
def test_a_wrong_graph_field_is_refused_by_name(converted, tmp_path, field, value, message):
    out, _ = converted

    def change(raw):
        raw["graphs"]["context_step"][field] = value
    with pytest.raises(ManifestError, match=message):
        Manifest.load(_rewrite(out, tmp_path, change))


def test_another_schema_and_broken_json_are_refused(converted, tmp_path):
    out, _ = converted
    with pytest.raises(ManifestError, match=f"schema 1; this trt-twotower reads schema "
                                            f"{MANIFEST_SCHEMA}"):
        Manifest.load(_rewrite(out, tmp_path, lambda raw: raw.update(schema=1)))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_an_invalid_config_is_refused(converted, tmp_path):
    out, _ = converted

    def change(raw):
        raw["config"]["hidden_size"] = "wide"
    with pytest.raises(ManifestError, match="config is invalid"):
        Manifest.load(_rewrite(out, tmp_path, change))


def test_graph_weights_changed_on_disk_are_refused_before_loading(converted, tmp_path):
    """Weights scaled by -3 in .onnx.data ran with exit 0 before graphs carried digests."""
    import shutil

    import numpy as np

    from trt_twotower.runtime.backends import open_onnxruntime

    out, written = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    open_onnxruntime(copy)  # untouched: loads
    data = copy / written.graphs["denoiser_step"].data_file
    weights = np.fromfile(data, dtype=np.float32)
    (weights * -3).tofile(data)
    with pytest.raises(ManifestError, match="denoiser_step.onnx.data does not match its "
                                            "manifest digest"):
        open_onnxruntime(copy)
    (copy / written.graphs["context_step"].file).unlink()
    with pytest.raises(ManifestError, match="context_step.onnx of graph context_step is "
                                            "missing"):
        Manifest.load(copy).verify_graphs(copy)
