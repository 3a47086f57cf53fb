"""`generate --prompt-ids` on a checkpoint that has no tokenizer.json: token ids in, token
ids out, the same ids the checkpoint generates with its tokenizer present."""

import json
import shutil

import pytest
from click.testing import CliRunner

from trt_twotower.cli import main

PROMPT = "5,6,7"
GENERATE = ["--prompt-ids", PROMPT, "--max-new-tokens", "16", "--block-size", "8"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(a checkpoint with its tokenizer, a copy of it without tokenizer.json)."""
    root = tmp_path_factory.mktemp("prompt-ids")
    full = root / "full"
    made = run("make-checkpoint", "--preset", "tiny", "--seed", 3, full)
    assert made.exit_code == 0, made.output
    bare = shutil.copytree(full, root / "bare")
    (bare / "tokenizer.json").unlink()
    return full, bare


def _generated(checkpoint, *extra):
    result = run("generate", "--checkpoint", checkpoint, *GENERATE, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_prompt_ids_need_no_tokenizer_and_generate_the_same_ids(checkpoints):
    full, bare = checkpoints
    with_tokenizer, without = _generated(full), _generated(bare)
    assert without["generated_ids"] == with_tokenizer["generated_ids"]
    assert without["prompt_ids"] == [5, 6, 7] and without["text"] is None


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_without_a_tokenizer_the_output_is_the_ids(checkpoints, stream):
    full, bare = checkpoints
    result = run("generate", "--checkpoint", bare, *GENERATE, *stream)
    assert result.exit_code == 0, result.output
    expected = [5, 6, 7, *_generated(full)["generated_ids"]]
    assert result.stdout.splitlines()[0] == ",".join(map(str, expected))


def test_an_offline_batch_of_ids_needs_no_tokenizer(checkpoints, tmp_path):
    full, bare = checkpoints
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": "ids", "prompt_ids": [5, 6, 7]}\n'
                     '{"id": "text", "prompt": "def f():"}\n')
    out = tmp_path / "out.jsonl"
    result = run("generate", "--checkpoint", bare, "--max-new-tokens", 16, "--block-size", 8,
                 "--input", lines, "--output", out)
    assert result.exit_code == 1 and "1 line(s) could not run" in result.output
    answers = {a["id"]: a for a in map(json.loads, out.read_text().splitlines())}
    assert answers["ids"]["generated_ids"] == _generated(full)["generated_ids"]
    assert answers["ids"]["text"] is None
    assert "tokenizer.json" in answers["text"]["error"]


def test_a_text_prompt_without_a_tokenizer_is_a_clear_error(checkpoints):
    _, bare = checkpoints
    result = run("generate", "--checkpoint", bare, "--prompt", "def f():")
    assert result.exit_code == 1
    assert "no tokenizer.json in" in result.output and "Traceback" not in result.output


def test_another_backend_without_a_tokenizer_is_a_clear_error(checkpoints):
    _, bare = checkpoints
    result = run("generate", "--checkpoint", bare, "--backend", "onnxruntime", *GENERATE)
    assert result.exit_code == 1
    assert "no tokenizer.json in" in result.output and "Traceback" not in result.output
