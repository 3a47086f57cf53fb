"""The TensorRT plugin wrappers, in everything that runs without a GPU: registration, the
serialised fields' round trip through a creator, output types and format support, the
build-time shape checks, workspace sizes, and what enqueue hands the kernel library (recorded
by a fake library in place of the compiled one)."""

import ctypes
import gc
import sys

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")

from trt_twotower.config import PRESETS  # noqa: E402
from trt_twotower.engine.plugin_library import (PLUGIN_LIBRARY_ENV,  # noqa: E402
                                                load_plugin_library)
from trt_twotower.engine.plugins import (ATTENTION, NAMESPACE, UNMASK,  # noqa: E402
                                         PluginShapeError, check_plugin_shapes,
                                         register_plugins)
from tests.conftest import needs_plugin_library  # noqa: E402


@pytest.fixture(scope="module")
def creators():
    return register_plugins(trt)


def test_both_creators_are_in_the_registry_under_the_namespace(creators):
    registry = trt.get_plugin_registry()
    for name in (ATTENTION, UNMASK):
        creator = registry.get_creator(name, "1", NAMESPACE)
        assert creator is not None and creator.name == name
    assert register_plugins(trt) is creators  # registering twice is a no-op


def test_fields_round_trip_through_the_creator(creators):
    fields = trt.PluginFieldCollection([trt.PluginField(
        "mask_token_id", np.array([3], dtype=np.int64), trt.PluginFieldType.INT64)])
    plugin = creators[UNMASK].create_plugin(UNMASK, fields, trt.TensorRTPhase.BUILD)
    assert plugin.fields == {"mask_token_id": 3}
    again = creators[UNMASK].create_plugin(UNMASK, plugin.get_fields_to_serialize(),
                                           trt.TensorRTPhase.RUNTIME)
    assert again.fields == plugin.fields and again.clone().fields == plugin.fields


def test_output_types(creators):
    attention = creators[ATTENTION].create_plugin(ATTENTION, trt.PluginFieldCollection([]),
                                                  trt.TensorRTPhase.BUILD)
    assert attention.get_output_data_types([trt.bfloat16] * 5 + [trt.int64]) == [trt.bfloat16]
    unmask = creators[UNMASK].create_plugin(UNMASK, trt.PluginFieldCollection([]),
                                            trt.TensorRTPhase.BUILD)
    assert unmask.get_output_data_types([trt.bfloat16, trt.int64]) == [trt.int64, trt.float32,
                                                                       trt.int64]
    assert unmask.num_outputs == 3 and attention.num_outputs == 1


def _desc(dtype):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type, d.desc.format = dtype, trt.TensorFormat.LINEAR
    return d


def test_format_support_follows_the_kernels(creators):
    attention = creators[ATTENTION].create_plugin(ATTENTION, trt.PluginFieldCollection([]),
                                                  trt.TensorRTPhase.BUILD)
    half = [_desc(trt.float16)] * 3 + [_desc(trt.int64)] + [_desc(trt.float16)] * 3
    assert all(attention.supports_format_combination(i, half, 6) for i in range(7))
    mixed = [_desc(trt.float16), _desc(trt.bfloat16)] + half[2:]
    assert not attention.supports_format_combination(1, mixed, 6)
    fp32 = [_desc(trt.float32)] * 3 + half[3:]
    assert not attention.supports_format_combination(0, fp32, 6)


def test_serialized_fields_outlive_other_allocations(creators):
    fields = trt.PluginFieldCollection([trt.PluginField(
        "mask_token_id", np.array([123456789], dtype=np.int64), trt.PluginFieldType.INT64)])
    plugin = creators[UNMASK].create_plugin(UNMASK, fields, trt.TensorRTPhase.BUILD)
    serialized = plugin.get_fields_to_serialize()
    del fields
    churn = [np.full(1, -7, dtype=np.int64) for _ in range(20000)]
    gc.collect()
    assert [int(np.asarray(f.data)[0]) for f in serialized] == [123456789]
    assert len(churn) == 20000


def _dynamic(dims, low=None):
    d = trt.DynamicPluginTensorDesc()
    d.desc.dims = d.max = d.opt = trt.Dims(dims)
    d.min = trt.Dims(low or dims)
    d.desc.format = trt.TensorFormat.LINEAR
    return d


def _attention_descs(b, s, hq, hkv, d, lmax, b_min=1):
    q = _dynamic([b, s, hq, d], [b_min, s, hq, d])
    kv = _dynamic([b, hkv, lmax, d], [b_min, hkv, lmax, d])
    blk = _dynamic([b, hkv, s, d], [b_min, hkv, s, d])
    return [q, kv, kv, _dynamic([b], [b_min]), blk, blk]


def _plugin(creators, name, mask_token_id=3):
    fields = [] if name == ATTENTION else [trt.PluginField(
        "mask_token_id", np.array([mask_token_id], dtype=np.int64), trt.PluginFieldType.INT64)]
    return creators[name].create_plugin(name, trt.PluginFieldCollection(fields),
                                        trt.TensorRTPhase.BUILD)


def test_build_refuses_head_sizes_the_kernel_lacks(creators):
    attention = _plugin(creators, ATTENTION)
    attention.configure_plugin(_attention_descs(4, 16, 32, 2, 128, 4096), [])
    with pytest.raises(PluginShapeError, match=r"head size 48 .*\[16, 32, 64, 128\]"):
        attention.configure_plugin(_attention_descs(4, 16, 32, 2, 48, 4096), [])
    with pytest.raises(PluginShapeError, match="head size 96"):
        check_plugin_shapes(PRESETS["tiny"].replace(head_dim=96), 16, 4)


def test_build_refuses_blocks_the_unmask_kernel_cannot_hold(creators):
    unmask = _plugin(creators, UNMASK)
    unmask.configure_plugin([_dynamic([8, 1024, 1000], [1, 1024, 1000])], [])
    with pytest.raises(PluginShapeError, match=r"block size 2048 .*1024"):
        unmask.configure_plugin([_dynamic([1, 2048, 1000])], [])
    with pytest.raises(PluginShapeError, match="65535 positions"):
        unmask.configure_plugin([_dynamic([128, 1024, 1000], [1, 1024, 1000])], [])
    with pytest.raises(PluginShapeError, match="mask token id 3 .* vocabulary of 3"):
        unmask.configure_plugin([_dynamic([1, 16, 3])], [])
    check_plugin_shapes(PRESETS["nano-30b-a3b"], 16, 64)
    with pytest.raises(PluginShapeError, match="block size 1025"):
        check_plugin_shapes(PRESETS["nano-30b-a3b"], 1025, 1)


@needs_plugin_library
def test_workspace_is_the_launchers_size_for_the_profiles_maximum(creators, plugin_library):
    attention = _plugin(creators, ATTENTION)
    descs = _attention_descs(8, 16, 32, 2, 128, 8192)
    assert attention.get_workspace_size(descs, []) == \
        plugin_library.tt_block_cross_attention_workspace_bytes(8, 16, 32, 2, 128, 8192) > 0
    unmask = _plugin(creators, UNMASK)
    logits = [_dynamic([64, 16, 131072], [1, 16, 131072])]
    assert unmask.get_workspace_size(logits, []) == \
        plugin_library.tt_confidence_unmask_workspace_bytes(64, 16, 131072) > 0


class _Function:
    """A C function of the fake library: records its arguments, accepts ctypes' attributes."""

    def __init__(self, calls, name, result):
        self.calls, self.name, self.result = calls, name, result

    def __call__(self, *args):
        self.calls.append((self.name, args))
        return self.result


class _FakeLibrary:
    opened: list = []

    def __init__(self, path):
        _FakeLibrary.opened.append(path)
        self.calls = []
        for name, result in (("tt_error_string", b"fake"), ("tt_block_cross_attention", 0),
                             ("tt_block_cross_attention_workspace_bytes", 4096),
                             ("tt_confidence_unmask", 0),
                             ("tt_confidence_unmask_workspace_bytes", 512)):
            setattr(self, name, _Function(self.calls, name, result))


@pytest.fixture
def fake_library(monkeypatch, tmp_path):
    """Every library ctypes opens is a recorder; torch cannot be imported."""
    _FakeLibrary.opened = []
    monkeypatch.setattr(ctypes, "CDLL", _FakeLibrary)
    path = tmp_path / "libtwotower_plugins.so"
    path.write_bytes(b"")
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, str(path))
    monkeypatch.setitem(sys.modules, "torch", None)
    return _FakeLibrary


def _runtime(dims, dtype):
    d = trt.PluginTensorDesc()
    d.dims, d.type, d.format = trt.Dims(dims), dtype, trt.TensorFormat.LINEAR
    return d


WORKSPACE, STREAM = 0x7f0000100000, 0x5000


def test_attention_enqueue_uses_tensorrts_workspace_and_opens_the_library_once(
        creators, fake_library):
    attention = _plugin(creators, ATTENTION)
    descs = [_runtime(dims, trt.bfloat16) for dims in ([2, 16, 4, 16], [2, 2, 64, 16])]
    inputs = [0x1000 * (i + 1) for i in range(6)]
    for _ in range(2):
        attention.enqueue(descs, descs[:1], inputs, [0x9000], WORKSPACE, STREAM)
    assert len(fake_library.opened) == 1
    lib_calls = [c for c in load_plugin_library().calls if c[0] == "tt_block_cross_attention"]
    assert len(lib_calls) == 2
    args = lib_calls[0][1]
    assert args[:9] == (*inputs, 0x9000, WORKSPACE, 4096)
    assert args[9:] == (2, 16, 4, 2, 16, 64, 2, STREAM)


def test_unmask_enqueue_reads_the_scalars_on_the_device(creators, fake_library):
    unmask = _plugin(creators, UNMASK, mask_token_id=7)
    descs = [_runtime([2, 16, 1000], trt.float32), _runtime([2, 16], trt.int64),
             _runtime([], trt.float32), _runtime([], trt.int64)]
    inputs, outputs = [0x1000, 0x2000, 0x3000, 0x4000], [0x5000, 0x6000, 0x7000]
    for _ in range(2):
        unmask.enqueue(descs, [], inputs, outputs, WORKSPACE, STREAM)
    assert len(fake_library.opened) == 1  # the plugin library, and no CUDA runtime
    name, args = [c for c in load_plugin_library().calls if c[0] == "tt_confidence_unmask"][0]
    assert args[:8] == (0x1000, 0x2000, 0x5000, 0x6000, 0x7000, None, WORKSPACE, 512)
    assert args[8:14] == (2, 16, 1000, 7, 0x3000, 0x4000)  # threshold, steps_left: pointers
    assert args[-1] == STREAM


def test_enqueue_raises_with_the_librarys_error_message(creators, fake_library):
    attention = _plugin(creators, ATTENTION)
    descs = [_runtime(dims, trt.float16) for dims in ([1, 4, 2, 16], [1, 2, 8, 16])]
    attention.enqueue(descs, descs[:1], [8] * 6, [8], WORKSPACE, STREAM)
    library = load_plugin_library()
    library.tt_block_cross_attention.result = 5
    with pytest.raises(RuntimeError, match=r"BlockCrossAttention: fake \(code 5\)"):
        attention.enqueue(descs, descs[:1], [8] * 6, [8], WORKSPACE, STREAM)
