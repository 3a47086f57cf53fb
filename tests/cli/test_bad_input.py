"""Every bad input to the command line ends in one line, never a traceback: a table of
(arguments, exit code, a piece of the message), one row per mistake a user can make, so that a
new command or option joins it with one line.

Exit code 2 is click's usage error (``Usage: ...`` then ``Error: ...``), 1 an error the command
found (``Error: ...``). Each row is refused while the options are checked or while the inputs are
read, before any model runs or any server starts; a row that would start a tritonserver fails."""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from trt_twotower.cli import main

GRAPHS_ARGS = ["--preset", "tiny", "--max-context", "64", "--quiet"]
DEAD_TIMEOUT_S = 3.0

# (command line with {placeholders} of the `paths` fixture, exit code, part of the message)
CASES: list[tuple[str, int, str]] = [
    # make-checkpoint
    ("make-checkpoint --max-shard-mb nan {tmp}/m1", 2, "not a finite number above 0"),
    ("make-checkpoint --max-shard-mb inf {tmp}/m2", 2, "not a finite number above 0"),
    ("make-checkpoint --max-shard-mb -1 {tmp}/m3", 2, "not a finite number above 0"),
    ("make-checkpoint --max-shard-mb 0 {tmp}/m4", 2, "not a finite number above 0"),
    ("make-checkpoint --max-shard-mb lots {tmp}/m5", 2, "'lots' is not a number"),
    ("make-checkpoint /proc/nope", 1, "cannot write a checkpoint to /proc/nope"),
    ("make-checkpoint {file}/sub", 1, "cannot write a checkpoint to"),
    ("make-checkpoint {file}", 2, "is a file"),
    ("make-checkpoint --preset huge {tmp}/m6", 2, "'huge' is not one of"),
    ("make-checkpoint --seed 1e23 {tmp}/m7", 2, "'1e23' is not a valid integer"),
    ("make-checkpoint --seed 100000000000000000000000 {tmp}/m8", 2, "not in the range"),
    ("make-checkpoint --seed -1 {tmp}/m9", 2, "not in the range"),
    ("make-checkpoint", 2, "Missing argument 'OUT'"),
    # convert
    ("convert {ckpt} --preset tiny -o {tmp}/c1", 2, "not both"),
    ("convert -o {file}/sub --preset tiny", 1, "cannot write"),
    ("convert --lowering magic -o {tmp}/c2", 2, "'magic' is not one of"),
    ("convert --dtype int8 -o {tmp}/c3", 2, "'int8' is not one of"),
    ("convert --graph nope -o {tmp}/c4", 2, "'nope' is not one of"),
    ("convert --max-context many -o {tmp}/c5", 2, "not a valid integer"),
    ("convert {tmp}/c-none -o {tmp}/c6", 2, "does not exist"),
    ("convert --preset tiny", 2, "Missing option '-o'"),
    ("convert {bad_json} -o {tmp}/c7", 1, "is not valid JSON"),
    ("convert {wrong_type} -o {tmp}/c8", 1, "num_hidden_layers"),
    ("convert {empty} -o {tmp}/c9", 1, "no config.json"),
    ("convert {truncated_ckpt} -o {tmp}/c10", 1, "truncated"),
    ("convert {pickle_ckpt} -o {tmp}/c11", 1, "pickle"),
    ("convert {non_utf8_config} -o {tmp}/c15", 1, "is not valid JSON"),
    ("convert {missing_shard} -o {tmp}/c12", 1, "missing"),
    ("convert {bad_index} -o {tmp}/c13", 1, "weight_map"),
    ("convert {wrong_shape} -o {tmp}/c14", 1, "has shape [1], expected"),
    # build
    ("build --max-batch 0 -o {tmp}/b1", 2, "--max-batch"),
    ("build --max-context 0 -o {tmp}/b2", 2, "--max-context"),
    ("build --block-size -16 -o {tmp}/b3", 2, "--block-size"),
    ("build --max-prefill 0 -o {tmp}/b4", 2, "--max-prefill"),
    ("build --gpu-memory 0 -o {tmp}/b5", 2, "--gpu-memory"),
    ("build --gpu-memory nope -o {tmp}/b6", 2, "not a valid float"),
    ("build --flavor cuda -o {tmp}/b7", 2, "'cuda' is not one of"),
    ("build --dtype fp64 -o {tmp}/b8", 2, "'fp64' is not one of"),
    ("build --lowering magic -o {tmp}/b9", 2, "'magic' is not one of"),
    ("build --graph nope -o {tmp}/b10", 2, "'nope' is not one of"),
    ("build {ckpt} --preset tiny --gpu-memory 0.001 -o {tmp}/b11", 2, "not both"),
    ("build --preset tiny", 2, "Missing option '-o'"),
    ("build {bad_json} --gpu-memory 80 -o {tmp}/b12", 1, "is not valid JSON"),
    ("build --timing-cache {tmp} -o {tmp}/b13", 2, "is a directory"),
    ("build --context-device -1 -o {tmp}/b14", 2, "--context-device"),
    ("build --denoiser-device -3 -o {tmp}/b15", 2, "--denoiser-device"),
    # plan
    ("plan --max-batch 0", 2, "--max-batch"),
    ("plan --max-context -5", 2, "--max-context"),
    ("plan --block-size 0", 2, "--block-size"),
    ("plan --gpu-memory 0", 2, "--gpu-memory"),
    ("plan --gpu-memory -3", 2, "--gpu-memory"),
    ("plan --gpu tpu", 2, "'tpu' is not one of"),
    ("plan --reserve -1", 2, "--reserve"),
    ("plan --context-device -1", 2, "--context-device"),
    ("plan --gpu h200-141gb --gpu-memory 100", 2, "not both"),
    ("plan {ckpt} --preset tiny", 2, "not both"),
    ("plan {empty}", 1, "no config.json"),
    ("plan {bad_json}", 1, "is not valid JSON"),
    ("plan {wrong_type}", 1, "num_hidden_layers"),
    ("plan {graphs} --dtype fp16", 2, "fixes the model and build settings"),
    # inspect
    # parity
    ("parity {graphs} --max-new-tokens 0", 2, "not in the range"),
    ("parity {graphs} --tolerance nan", 2, "not a finite number above 0"),
    ("parity {graphs} --tolerance -1", 2, "not a finite number above 0"),
    ("parity {graphs} --block-size 0", 2, "not in the range"),
    ("parity {graphs} --seed -1", 2, "not in the range"),
    ("parity {graphs} --seed 1e23", 2, "'1e23' is not a valid integer"),
    ("parity {graphs} --backend magic", 2, "'magic' is not one of"),
    ("parity {graphs} --backend tensorrt --context-device foo", 2, "neither cpu nor cuda:N"),
    ("parity {graphs} --backend tensorrt --denoiser-device cuda:7", 2, "is not here"),
    ("parity {graphs} --context-device cpu", 2, "give them with --backend tensorrt"),
    ("parity {tmp}/p-none", 2, "does not exist"),
    ("parity {empty}", 1, "no manifest.json"),
    ("parity {manifest_not_json}", 1, "not valid JSON"),
    ("parity {manifest_escaping_path}", 1, "inside the build"),
    ("parity {garbage_onnx}", 1, "digest"),
    ("parity {truncated_data}", 1, "digest"),
    ("parity", 2, "Missing argument 'BUILD_DIR'"),
    ("inspect {graphs}", 1, "no engines"),
    ("inspect {empty}", 1, "no manifest.json"),
    ("inspect {tmp}/i-none", 2, "does not exist"),
    ("inspect {manifest_not_json}", 1, "not valid JSON"),
    ("inspect {manifest_list}", 1, "manifest"),
    ("inspect {manifest_max_context_text}", 1, "max_context"),
    ("inspect {manifest_schema_1}", 1, "schema"),
    ("inspect {manifest_bad_config}", 1, "config"),
    ("inspect {manifest_escaping_path}", 1, "inside the build"),
    ("inspect {manifest_engines_number}", 1, "engines"),
    ("inspect {manifest_non_utf8}", 1, "manifest"),
    ("inspect {manifest_directory}", 1, "manifest.json"),
    ("inspect", 2, "Missing argument 'BUILD_DIR'"),
    # generate: options
    ("generate --seed 1e23", 2, "'1e23' is not a valid integer"),
    ("generate --seed 100000000000000000000000", 2, "not in the range"),
    ("generate --seed 9223372036854775808", 2, "not in the range"),
    ("generate --device cuda:7", 2, "cuda:7 is not here"),
    ("generate --device foo", 2, "neither cpu nor cuda:N"),
    ("generate --device cuda", 2, "is not here"),
    ("generate --device cuda:-1", 2, "neither cpu nor cuda:N"),
    ("generate --context-device gpu0", 2, "neither cpu nor cuda:N"),
    ("generate --denoiser-device cuda:1", 2, "is not here"),
    ("generate --max-new-tokens 0", 2, "--max-new-tokens"),
    ("generate --max-new-tokens -16", 2, "--max-new-tokens"),
    ("generate --max-new-tokens 4294967312", 2, "--max-new-tokens"),
    ("generate --max-new-tokens 20", 2, "multiple of block_size"),
    ("generate --block-size 0", 2, "block_size"),
    ("generate --steps-per-block 0", 2, "steps_per_block"),
    ("generate --confidence-threshold 1.5", 2, "confidence_threshold"),
    ("generate --confidence-threshold nan", 2, "confidence_threshold"),
    ("generate --temperature -1", 2, "temperature"),
    ("generate --temperature nan", 2, "temperature"),
    ("generate --mode ar --top-k 0", 2, "top_k"),
    ("generate --mode ar --top-p 0", 2, "top_p"),
    ("generate --mode ar --top-p nan", 2, "top_p"),
    ("generate --mode beam", 2, "'beam' is not one of"),
    ("generate --dtype int8", 2, "'int8' is not one of"),
    ("generate --backend tensorflow", 2, "'tensorflow' is not one of"),
    ("generate --prompt-ids 1,x", 2, "comma-separated integers"),
    ("generate --prompt-ids ,", 2, "at least one token id"),
    ("generate --prompt a --prompt-ids 1", 2, "not both"),
    ("generate --prompt '\udcff\udcfe'", 2, "not valid UTF-8"),
    ("generate --input {file}", 2, "needs both --input and --output"),
    ("generate --input {file} --output {tmp}/o.jsonl --prompt hi", 2, "drop --prompt"),
    ("generate --input {file} --output {file}", 2, "must not be the --input file"),
    ("generate --output {tmp}/o.jsonl", 2, "needs both --input and --output"),
    ("generate --checkpoint {ckpt} --preset tiny", 2, "not both"),
    ("generate --build-dir {graphs}", 2, "--build-dir is for"),
    ("generate --backend tensorrt", 2, "--build-dir"),
    ("generate --checkpoint {tmp}/g-none", 2, "does not exist"),
    # generate: inputs that are read
    ("generate --prompt-ids 5,999999 --max-new-tokens 16", 2, "outside the model's vocabulary"),
    ("generate --prompt-ids -3 --max-new-tokens 16", 2, "outside the model's vocabulary"),
    ("generate --prompt '' --max-new-tokens 16", 2, "encodes to no tokens"),
    ("generate --max-new-tokens 2147483632", 2, "exceed the"),
    ("generate --checkpoint {empty}", 1, "no config.json"),
    ("generate --checkpoint {bad_json}", 1, "is not valid JSON"),
    ("generate --checkpoint {wrong_type}", 1, "num_hidden_layers"),
    ("generate --checkpoint {truncated_ckpt}", 1, "truncated"),
    ("generate --checkpoint {pickle_ckpt}", 1, "pickle"),
    ("generate --checkpoint {missing_shard}", 1, "missing"),
    ("generate --checkpoint {bad_tokenizer}", 1, "tokenizer"),
    ("generate --checkpoint {wrong_shape}", 1, "has shape [1], expected"),
    ("generate --backend onnxruntime --build-dir {garbage_onnx} --max-new-tokens 16", 1,
     "context_step.onnx"),
    ("generate --backend onnxruntime --build-dir {truncated_data} --max-new-tokens 16", 1,
     "context_step.onnx"),
    ("generate --backend onnxruntime --build-dir {empty}", 1, "no manifest.json"),
    ("generate --backend onnxruntime --build-dir {manifest_max_context_text}", 1,
     "max_context"),
    ("generate --backend onnxruntime --build-dir {graphs} --max-new-tokens 256", 2,
     "exceed the 64 positions"),
    # bench
    ("bench --thresholds a", 2, "comma-separated list of floats"),
    ("bench --thresholds 1.5", 2, "out of range"),
    ("bench --thresholds ,", 2, "at least one value"),
    ("bench --block-sizes 0", 2, "out of range"),
    ("bench --block-sizes 8,x", 2, "comma-separated list of ints"),
    ("bench --steps-per-block 0", 2, "out of range"),
    ("bench --batch-sizes 0", 2, "out of range"),
    ("bench --batch-sizes ''", 2, "at least one value"),
    ("bench --forced-commits 0", 2, "out of range"),
    ("bench --forced-commits 32", 2, "forced_commits"),
    ("bench --max-new-tokens 0", 2, "--max-new-tokens"),
    ("bench --max-new-tokens 20", 2, "multiple of block_size"),
    ("bench --prompt-length 0", 2, "--prompt-length"),
    ("bench --device foo", 2, "neither cpu nor cuda:N"),
    ("bench --device cuda:3", 2, "is not here"),
    ("bench --seed 1e23", 2, "not a valid integer"),
    ("bench --backend tensorrt", 2, "'tensorrt' is not one of"),
    ("bench --checkpoint {ckpt} --preset tiny -o {tmp}/bench", 2, "not both"),
    ("bench -o {file}/sub", 2, "cannot create"),
    ("bench --serve --clients 0", 2, "out of range"),
    ("bench --max-new-tokens 2147483632 --prompt-length 8 -o {tmp}/bench", 2, "exceed the"),
    # serve: bad options only; none of these may start a server
    ("serve --prefill-tokens 0", 2, "not in the range"),
    ("serve --max-waiting -3", 2, "not in the range"),
    ("serve --work-dir /proc/nope", 2, "cannot create /proc/nope"),
    ("serve --work-dir {file}/sub", 2, "cannot create"),
    ("serve --max-tokens -1", 2, "--max-tokens"),
    ("serve --max-tokens 0", 2, "--max-tokens"),
    ("serve --max-tokens 4294967312", 2, "--max-tokens"),
    ("serve --max-context -5", 2, "--max-context"),
    ("serve --max-context 0", 2, "--max-context"),
    ("serve --block-sizes 0,-16", 2, "out of range"),
    ("serve --block-sizes x", 2, "comma-separated list of ints"),
    ("serve --block-sizes ''", 2, "at least one value"),
    ("serve --capacity 0", 2, "--capacity"),
    ("serve --bls-instances 0", 2, "--bls-instances"),
    ("serve --capacity 1 --bls-instances 2", 1, "capacity"),
    ("serve --cpu-threads -1", 2, "--cpu-threads"),
    ("serve --grpc-port 70000", 2, "--grpc-port"),
    ("serve --http-port -1", 2, "--http-port"),
    ("serve --grpc-port 9000 --http-port 9000", 2, "must differ"),
    ("serve --preset huge", 2, "'huge' is not one of"),
    ("serve --address 192.0.2.1", 2, "cannot listen on 192.0.2.1"),
    ("serve {graphs} --backend tensorrt", 1, "no engine for the context tower"),
    ("serve --checkpoint {ckpt} --preset tiny", 2, "not both"),
    ("serve --context-device cuda:7", 2, "is not here"),
    ("serve --denoiser-device gpu1", 2, "neither cpu nor cuda:N"),
    ("serve --dtype int8", 2, "'int8' is not one of"),
    ("serve --backend onnxruntime", 2, "BUILD_DIR"),
    ("serve {graphs}", 2, "BUILD_DIR is served by"),
    ("serve {graphs} --backend onnxruntime --checkpoint {ckpt}", 2, "drop --checkpoint"),
    ("serve {graphs} --backend onnxruntime --max-context 1000", 2, "exceeds the 64 positions"),
    ("serve {empty} --backend onnxruntime", 1, "no manifest.json"),
    ("serve {manifest_max_context_text} --backend onnxruntime", 1, "max_context"),
    # client: no server runs; a dead address is a clear error within the timeout
    ("client --url {dead} --prompt x --timeout 3", 1, "cannot reach"),
    ("client --url {dead} --prompt x --timeout -1", 2, "not a finite number above 0"),
    ("client --url {dead} --prompt x --timeout 0", 2, "not a finite number above 0"),
    ("client --url {dead} --prompt x --timeout nan", 2, "not a finite number above 0"),
    ("client --url {dead} --prompt x --timeout inf", 2, "not a finite number above 0"),
    ("client --url {dead} --prompt '\udcff' --timeout 3", 2, "not valid UTF-8"),
    ("client --url {dead} --prompt x --max-tokens 4294967312", 2, "--max-tokens"),
    ("client --url {dead} --prompt x --max-tokens 0", 2, "--max-tokens"),
    ("client --url {dead} --prompt x --max-tokens -1", 2, "--max-tokens"),
    ("client --url {dead} --prompt x --block-size 4294967312", 2, "--block-size"),
    ("client --url {dead} --prompt x --steps-per-block 0", 2, "--steps-per-block"),
    ("client --url {dead} --prompt x --max-tokens 20", 2, "multiple of block_size"),
    ("client --url {dead} --prompt x --confidence-threshold 2", 2, "confidence_threshold"),
    ("client --url {dead} --prompt x --temperature -1", 2, "temperature"),
    ("client --url {dead} --prompt x --seed 1e23", 2, "not a valid integer"),
    ("client --url {dead} --prompt x --seed 9223372036854775808", 2, "not in the range"),
    ("client --url {dead} --prompt x --mode beam", 2, "'beam' is not one of"),
    ("client --url {dead}", 2, "Missing option '--prompt'"),
]


def _write_manifest(root: Path, name: str, base: dict, change: Callable[[dict], None]) -> None:
    folder = root / name
    folder.mkdir()
    manifest = json.loads(json.dumps(base))
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _manifest_dirs(root: Path, graphs: Path) -> None:
    """Build directories whose manifest is wrong in one way each."""
    base = json.loads((graphs / "manifest.json").read_text())
    _write_manifest(root, "manifest_max_context_text", base,
                    lambda m: m.update(max_context="64"))
    _write_manifest(root, "manifest_schema_1", base, lambda m: m.update(schema=1))
    _write_manifest(root, "manifest_bad_config", base,
                    lambda m: m["config"].update(num_hidden_layers="four"))
    _write_manifest(root, "manifest_escaping_path", base,
                    lambda m: m["graphs"]["context_step"].update(file="../../../../etc/passwd"))
    _write_manifest(root, "manifest_engines_number", base, lambda m: m.update(engines=5))
    for name, content in (("manifest_not_json", b"{"), ("manifest_list", b"[]"),
                          ("manifest_non_utf8", b"\xff\xfe{}")):
        (root / name).mkdir()
        (root / name / "manifest.json").write_bytes(content)
    (root / "manifest_directory" / "manifest.json").mkdir(parents=True)


def _checkpoint_dirs(root: Path, ckpt: Path) -> None:
    """Checkpoint directories that are broken in one way each."""
    def copy(name: str) -> Path:
        return shutil.copytree(ckpt, root / name)

    (copy("bad_json") / "config.json").write_text("{")
    (copy("non_utf8_config") / "config.json").write_bytes(b"\xff\xfe{}")
    config = json.loads((ckpt / "config.json").read_text())
    (copy("wrong_type") / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": "four"}))
    weights = copy("truncated_ckpt") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    pickled = copy("pickle_ckpt")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    (copy("missing_shard") / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    (copy("bad_index") / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    (copy("bad_tokenizer") / "tokenizer.json").write_text("not a tokenizer")
    weights = copy("wrong_shape") / "model.safetensors"
    tensors = load_file(weights)
    tensors["context_tower.layers.0.mixer.D"] = tensors["context_tower.layers.0.mixer.D"][:1]
    save_file(tensors, weights)


def _graph_dirs(root: Path, graphs: Path) -> None:
    """Converted graphs with a garbled graph file or truncated external data."""
    garbage = shutil.copytree(graphs, root / "garbage_onnx")
    (garbage / "context_step.onnx").write_bytes(b"this is not a protobuf")
    data = shutil.copytree(graphs, root / "truncated_data") / "context_step.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Every directory the table names, prepared once: a tiny checkpoint, tiny graphs, and
    broken copies of both."""
    from trt_twotower.config import preset
    from trt_twotower.reference.loading import make_random_checkpoint
    from trt_twotower.serve.server import free_port
    from trt_twotower.tokenizer import builtin_tokenizer

    root = tmp_path_factory.mktemp("bad-input")
    ckpt = make_random_checkpoint(preset("tiny"), root / "ckpt")
    builtin_tokenizer().save(ckpt)
    graphs = root / "graphs"
    converted = CliRunner().invoke(main, ["convert", "-o", str(graphs), *GRAPHS_ARGS])
    assert converted.exit_code == 0, converted.output
    _checkpoint_dirs(root, ckpt)
    _graph_dirs(root, graphs)
    _manifest_dirs(root, graphs)
    (root / "empty").mkdir()
    (root / "file").write_text("a file, not a directory")
    (root / "tmp").mkdir()
    names = {p.name: str(p) for p in root.iterdir()}
    return {**names, "dead": f"127.0.0.1:{free_port()}"}


@pytest.fixture(autouse=True)
def no_server_starts(monkeypatch):
    """A row that got as far as starting tritonserver was not refused at the edge."""
    from trt_twotower.serve.server import TritonServer

    def refuse(self, *args, **kwargs):
        raise AssertionError("a bad-input row started a tritonserver")
    monkeypatch.setattr(TritonServer, "start", refuse)


def test_the_table_covers_every_command_with_over_a_hundred_rows():
    commands = {shlex.split(line)[0] for line, _, _ in CASES}
    assert len(CASES) >= 100
    assert commands >= {"make-checkpoint", "convert", "build", "plan", "inspect", "generate",
                        "bench", "serve", "client"}


@pytest.mark.parametrize("line,code,needle", CASES,
                         ids=[f"{i:03d}-{line.split()[0]}" for i, (line, _, _) in
                              enumerate(CASES)])
def test_a_bad_input_is_one_line_error(paths, line, code, needle):
    args = [arg.format(**paths) for arg in shlex.split(line)]
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    took = time.monotonic() - start
    assert isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception} escaped\n{result.output}"
    assert "Traceback" not in result.output
    lines = [text for text in result.output.splitlines() if text.strip()]
    assert lines and lines[-1].startswith("Error:"), result.output
    assert (result.exit_code, needle in lines[-1]) == (code, True), result.output
    if args[0] == "client":
        assert took < DEAD_TIMEOUT_S + 2.0
