"""``trt-twotower plan``: its tables, its exit codes, build directories and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from trt_twotower.cli import main
from trt_twotower.config import preset
from trt_twotower.engine.memory_plan import GIB

BUILD_SUMMARIES = {"context_step": 3 * GIB, "denoiser_step": 3 * GIB // 4}


def run(*args, code=0):
    result = CliRunner().invoke(main, ["plan", *map(str, args)])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    return result.output


def rows(output: str) -> dict[str, list[str]]:
    """The first table's rows by label."""
    table = output.split("\n\n")[1].splitlines()
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table[2:]}


def test_fitting_plan_prints_each_gpu_and_exits_0():
    out = run("--preset", "tiny", "--gpu", "h200-141gb")
    assert "| GiB | context GPU 0 | denoiser GPU 1 |" in out
    assert rows(out)["H200 141GB memory"] == ["139.80", "139.80"]
    assert "| 1,024 |" in out and "| 4,096 |" in out and "8,192" not in out  # tiny's limit
    assert "largest max context at max batch 4: context GPU 0: 4,096 (the model's limit)" in out
    assert "fits:" in out


def test_one_device_holds_both_towers():
    out = run("--preset", "tiny", "--context-device", 1, "--denoiser-device", 1)
    assert "| GiB | GPU 1 |" in out and "both towers on GPU 1" in out


def test_released_model_fits_two_h100s_at_the_build_defaults():
    out = run("--preset", "nano-30b-a3b")
    table = rows(out)
    assert table["weights"] == ["58.83", "58.89"]
    assert all(float(v) > 0 for v in table["headroom"])


def test_overfilled_gpu_exits_1_saying_what_to_lower():
    out = run("--preset", "nano-30b-a3b", "--max-batch", 64, "--max-context", 131072, code=1)
    assert "headroom" in out                                   # the table comes first
    assert "Error: the context GPU (GPU 0) needs" in out and "the H100 80GB has 79.18 GiB" in out
    assert "lower --max-batch to" in out


def test_gpu_too_small_for_the_weights_says_so():
    out = run("--preset", "nano-30b-a3b", "--gpu-memory", 40, code=1)
    assert "weights and reserve alone need 59.83 GiB" in out


def test_checkpoint_directory_is_read_for_its_config_only(tmp_path):
    preset("tiny").save(tmp_path)                                # config.json, no weights
    out = run(tmp_path, "--max-batch", 2)
    assert f"memory plan of {tmp_path}" in out and "max batch 2" in out


def _build_dir(bf16_build, tmp_path, summaries=BUILD_SUMMARIES):
    """A copy of the session's engine build with the builder's activation figures replaced
    (``summaries``; a graph left out has no summary) and the denoiser moved to GPU 3."""
    out = tmp_path / "build"
    shutil.copytree(bf16_build, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw["engines"]["denoiser_step"]["device"] = 3
    (out / "manifest.json").write_text(json.dumps(raw))
    for graph in ("context_step", "denoiser_step"):
        summary = out / f"{graph}.summary.json"
        if graph in summaries:
            summary.write_text(json.dumps({"activation_bytes": summaries[graph],
                                           "weights_bytes": 1}))
        else:
            summary.unlink()
            (out / f"{graph}.build.log").unlink()
    return out


def test_build_dir_gives_settings_devices_and_the_builders_activation_memory(bf16_build,
                                                                            tmp_path):
    out = run(_build_dir(bf16_build, tmp_path))
    assert "bfloat16, max batch 2, max context 128, block 8, max prefill 64" in out
    assert "| GiB | context GPU 0 | denoiser GPU 3 |" in out
    assert rows(out)["activations (builder)"] == ["3.00", "0.75"]


def test_build_dir_without_a_summary_estimates_that_tower(bf16_build, tmp_path):
    out = run(_build_dir(bf16_build, tmp_path, {"context_step": GIB}))
    assert rows(out)["activations (builder/estimate)"][0] == "1.00"


def test_build_dir_refuses_settings_it_fixes_but_takes_devices(bf16_build, tmp_path):
    build = _build_dir(bf16_build, tmp_path)
    assert "drop --dtype, --max-batch" in run(build, "--max-batch", 8, "--dtype", "bf16",
                                              code=2)
    assert "| GiB | GPU 5 |" in run(build, "--context-device", 5, "--denoiser-device", 5)


def test_directory_that_is_neither_checkpoint_nor_build_is_a_clear_error(tmp_path):
    assert "has no config.json: it is not a checkpoint" in run(tmp_path, code=1)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "stage": "graphs"}))
    assert "has schema 1" in run(tmp_path, code=1)


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "a100-40gb"], "'a100-40gb' is not one of"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-context", "-5"], "--max-context"),
    (["--gpu-memory", "0"], "--gpu-memory"),
    (["--gpu", "h200-141gb", "--gpu-memory", "100"], "not both"),
    (["--reserve", "-1"], "--reserve"),
])
def test_bad_input_is_a_usage_error_without_a_traceback(args, needle):
    out = run("--preset", "tiny", *args, code=2)
    assert needle in out and "Traceback" not in out


def test_build_prints_the_plan_and_inspect_shows_it(bf16_cli):
    build_dir, output = bf16_cli
    for text in (output, CliRunner().invoke(main, ["inspect", str(build_dir)]).output):
        assert "memory plan: " in text and "| GiB | context GPU 0 | denoiser GPU 1 |" in text
        assert "activations (builder)" in text


def test_build_refuses_a_plan_that_does_not_fit_before_converting(tmp_path):
    """The released model's tower alone is 58.8 GiB: on a 40 GiB GPU nothing is written."""
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["build", "--preset", "nano-30b-a3b", "--gpu-memory", "40",
                                       "-o", str(out)])
    assert result.exit_code == 1 and "40 GiB GPU" in result.output, result.output
    assert isinstance(result.exception, SystemExit) and not out.exists()


def _traffic(out: str) -> dict[str, list[str]]:
    """The bandwidth table's rows by quantisation mode."""
    table = out.split("bandwidth floor at batch 1")[1].split("\n\n")[1].splitlines()
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table[2:]}


def test_quantized_plan_stores_fewer_weight_bytes_and_shows_every_modes_floor():
    out = run("--preset", "nano-30b-a3b", "--quantize", "int4-awq")
    int4 = rows(out)
    assert int4["weights"] == ["17.83", "17.89"]                     # bf16: 58.83, 58.89
    traffic = _traffic(out)
    assert list(traffic) == ["none (bfloat16)", "fp8", "int4-awq", "int4-rtn"]
    assert traffic["int4-awq"][:2] == int4["weights"]
    assert traffic["none (bfloat16)"][2] == "6.58"          # 6.47 GB weights + caches at 1k
    assert "41–69 (issue 19's measurements)" in out and "scope experts" in out


def test_quantize_scope_and_block_size_reach_the_plan():
    experts = _traffic(run("--preset", "nano-30b-a3b", "--quantize", "fp8"))
    everything = _traffic(run("--preset", "nano-30b-a3b", "--quantize", "fp8",
                              "--quantize-scope", "all-gemms"))
    assert float(everything["fp8"][0]) < float(experts["fp8"][0])
    assert float(everything["fp8"][2]) < float(experts["fp8"][2])
    fine = _traffic(run("--preset", "nano-30b-a3b", "--quantize-block-size", "32"))
    assert float(fine["int4-rtn"][0]) > float(experts["int4-rtn"][0])   # 4× the scales
