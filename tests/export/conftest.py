"""Graphs exported once per session from small random models (fp32, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trt_twotower import names
from trt_twotower.config import TwoTowerConfig, preset
from trt_twotower.export.convert import ConvertOptions, export_graph
from tests.conftest import random_model

MAX_CONTEXT = 96

# Random configurations besides the built-in one: other patterns, groups, heads, chunk sizes.
VARIANTS = {
    "tiny": preset("tiny"),
    "wide-groups": preset("tiny").replace(hybrid_override_pattern="M*EM*", n_groups=4,
                                          mamba_num_heads=8, chunk_size=3,
                                          num_attention_heads=6, num_key_value_heads=3),
    "mha-dense": preset("tiny").replace(hybrid_override_pattern="*-M*E", num_key_value_heads=4,
                                        conv_kernel=2, chunk_size=5, n_shared_experts=0),
}


def export_all(config: TwoTowerConfig, out: Path, lowering: str, seed: int = 0):
    model = random_model(config, seed)
    state = model.state_dict()
    options = ConvertOptions(lowering=lowering, max_context=MAX_CONTEXT)
    for graph in names.GRAPHS:
        export_graph(config, state.__getitem__, out, graph, options)
    return model


@pytest.fixture(scope="session", params=[(v, l) for v in VARIANTS for l in ("native",)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    variant, lowering = request.param
    out = tmp_path_factory.mktemp(f"{variant}-{lowering}")
    model = export_all(VARIANTS[variant], out, lowering)
    return VARIANTS[variant], model, out


@pytest.fixture(scope="session")
def exported_plugin(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-plugin")
    model = export_all(VARIANTS["tiny"], out, "plugin")
    return VARIANTS["tiny"], model, out
