"""The TensorRT plugin wrappers, in everything that runs without a GPU: registration, the
serialised fields' round trip through a creator, output types and format support."""

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")

from trt_twotower.engine.plugins import (ATTENTION, NAMESPACE, UNMASK,  # noqa: E402
                                         register_plugins)


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
