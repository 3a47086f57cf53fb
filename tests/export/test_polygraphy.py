"""Polygraphy runs the exported graphs on ONNX Runtime as they are on disk."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trt_twotower import names
from tests.export.conftest import MAX_CONTEXT


@pytest.mark.skipif(shutil.which("polygraphy", path=str(Path(sys.executable).parent)) is None,
                    reason="polygraphy is not installed")
def test_polygraphy_runs_the_context_step_graph(exported):
    config, _, out = exported
    shapes = ["input_ids:[1,5]", "past_length:[1]"]
    for spec in names.context_cache_inputs(config, MAX_CONTEXT):
        shapes.append(f"{spec.name}:[{','.join(str(1 if d == names.BATCH else d) for d in spec.shape)}]")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "polygraphy"), "run",
         str(out / f"{names.CONTEXT_STEP}.onnx"), "--onnxrt", "--input-shapes", *shapes,
         "--val-range", f"input_ids:[4,{config.vocab_size - 1}]", "past_length:[0,0]"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr, result.stderr[-2000:]
