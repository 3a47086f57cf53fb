"""The command line end to end on the built-in model and on written checkpoints."""

import csv
import json

import pytest
from click.testing import CliRunner

from trt_twotower.cli import main


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run("make-checkpoint", "--preset", "tiny", "--seed", 7, out)
    return out


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_generate_every_mode_on_builtin_and_written_checkpoint(checkpoint, mode):
    for source in ([], ["--checkpoint", checkpoint]):
        out = run("generate", *source, "--mode", mode, "--max-new-tokens", 16,
                  "--block-size", 8, "--json").output
        record = json.loads(out)
        assert len(record["generated_ids"]) <= 16 and record["prompt_ids"]
        stats = record["stats"]
        assert stats["mode"] == mode
        assert (stats["denoiser_evaluations"] > 0) == (mode != "ar")


def test_generate_is_deterministic_and_prompt_ids_work():
    a = run("generate", "--prompt-ids", "5,6,7", "--max-new-tokens", 16, "--json").output
    b = run("generate", "--prompt-ids", "5,6,7", "--max-new-tokens", 16, "--json").output
    assert json.loads(a)["generated_ids"] == json.loads(b)["generated_ids"]
    assert json.loads(a)["prompt_ids"] == [5, 6, 7]


@pytest.mark.parametrize("args,needle", [
    (["--max-new-tokens", "20"], "multiple of block_size"),
    (["--confidence-threshold", "1.5"], "confidence_threshold"),
    (["--block-size", "0"], "block_size"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--mode", "beam"], "beam"),
    (["--prompt", "a", "--prompt-ids", "1"], "not both"),
])
def test_generate_rejects_bad_options_clearly(args, needle):
    result = run("generate", *args, ok=False)
    assert result.exit_code == 2 and needle in result.output


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, checkpoint):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors"
                                        else f.read_bytes())
    result = run("generate", "--checkpoint", tmp_path, ok=False)
    assert result.exit_code == 1 and "truncated" in result.output


def test_convert_then_parity_passes_on_the_builtin_model(tmp_path):
    out = tmp_path / "graphs"
    run("convert", "-o", out, "--max-context", 96, "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"context_step", "denoiser_step"}
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    result = run("parity", out, "--block-size", 8, "--max-new-tokens", 16)
    assert "parity ok" in result.output and "FAIL" not in result.output


def test_generate_with_onnxruntime_matches_torch():
    args = ["--prompt-ids", "9,10,11", "--max-new-tokens", 16, "--block-size", 8, "--json"]
    torch_ids = json.loads(run("generate", *args).output)["generated_ids"]
    ort_ids = json.loads(run("generate", "--backend", "onnxruntime", *args).output)
    assert ort_ids["generated_ids"] == torch_ids


def test_convert_errors_are_clear(tmp_path, checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("convert", checkpoint, "-o", blocker / "out", ok=False)
    assert result.exit_code == 1 and "cannot write" in result.output
    result = run("convert", "-o", tmp_path / "o", "--lowering", "magic", ok=False)
    assert result.exit_code == 2 and "magic" in result.output


def test_help_texts_explain_each_command():
    out = run("--help").output
    for command in ("generate", "convert", "parity", "make-checkpoint", "bench"):
        assert command in out
    assert "diffusion" in run("generate", "--help").output


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_bench_writes_table_csv_and_plot(tmp_path, backend):
    out = run("bench", "--backend", backend, "--preset", "tiny", "--thresholds", "0.5,0.9",
              "--batch-sizes", "1,2", "--forced-commits", "4", "--max-new-tokens", 16,
              "--prompt-length", 8, "-o", tmp_path).output
    assert "speedup_vs_ar" in out
    import csv
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(rows) == 2 * (1 + 2 + 1)  # per batch: AR, two thresholds, one forced
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    forced = [r for r in rows if r["forced_commits"] == "4"]
    assert len(forced) == 2 and all(float(r["tokens_per_eval"]) == 4.0 for r in forced)
    diffusion = [r for r in rows if r["mode"] == "diffusion"]
    assert all(float(r["speedup_vs_ar"]) > 0 for r in diffusion)
    if backend == "torch":  # expert counts need the reference's modules
        assert all(1 <= float(r["experts_per_step"]) <= 8 for r in diffusion)


@pytest.mark.parametrize("mode", ["int4-awq", "fp8"])
def test_quantised_graphs_pass_parity_against_the_quantised_reference(tmp_path, mode):
    out = tmp_path / mode
    run("convert", "-o", out, "--max-context", 96, "--quantize", mode, "--quiet")
    result = run("parity", out, "--block-size", 8, "--max-new-tokens", 16)
    assert "parity ok" in result.output and "FAIL" not in result.output


def test_generate_runs_a_jsonl_file_and_a_rerun_resumes_it(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def add(a, b):"}\n'
                       '{"id": "x", "prompt_ids": [5, 6, 7], "mode": "ar", "max_new_tokens": 8}\n'
                       '{"prompt": "import os", "confidence_threshold": 7}\n')
    out = tmp_path / "answers.jsonl"
    first = run("generate", "--input", prompts, "--output", out, "--max-new-tokens", 16,
                ok=False)
    assert first.exit_code == 1 and "1 line(s) could not run" in first.output
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records[0]["generated_ids"]) == 16 and records[1]["id"] == "x"
    assert len(records[1]["generated_ids"]) == 8 and "confidence_threshold" in records[2]["error"]
    out.write_text("\n".join(out.read_text().splitlines()[:1]) + "\n")
    again = run("generate", "--input", prompts, "--output", out, "--max-new-tokens", 16,
                ok=False)
    assert "(1 already there)" in again.output
    resumed = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(resumed) == [0, 1, 2]
    assert all(resumed[i].get("generated_ids") == records[i].get("generated_ids")
               for i in range(3))


def test_bench_load_reports_every_case_under_every_load(tmp_path):
    result = run("bench", "--load", "--clients", "1,3", "--rates", "100", "--max-new-tokens",
                 32, "--block-sizes", 16, "--prompt-length", 6, "-o", tmp_path)
    table = (tmp_path / "load.md").read_text()
    for case in ("diffusion γ 0.5", "diffusion K=4", "AR"):
        for load in ("1 clients", "3 clients", "Poisson 100/s"):
            assert f"| {case} | {load} |" in table, (case, load)
    rows = list(csv.DictReader(open(tmp_path / "load.csv")))
    assert len(rows) == 9 and all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert {int(r["requests"]) for r in rows if r["load"] == "3 clients"} == {6}
    assert "wrote" in result.output


def test_flags_mean_the_same_in_every_command():
    """Precisions by long or short name, and one token-budget name with its alias."""
    assert run("plan", "--preset", "tiny", "--dtype", "bf16").output == \
        run("plan", "--preset", "tiny", "--dtype", "bfloat16").output
    args = ["generate", "--prompt-ids", "5,6,7", "--mode", "ar", "--json"]
    short = json.loads(run(*args, "--dtype", "fp32", "--max-tokens", 6).output)
    long = json.loads(run(*args, "--dtype", "float32", "--max-new-tokens", 6).output)
    assert short["generated_ids"] == long["generated_ids"] and len(short["generated_ids"]) == 6
    refused = run("convert", "--dtype", "int8", "-o", "never", ok=False)
    assert refused.exit_code == 2 and "'int8' is not one of float32" in refused.output
