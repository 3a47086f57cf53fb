"""Offline batch inference: JSONL lines (text or ids, per-line settings) through the step loop,
answers written as requests finish, bad lines answered with their error, and a restarted run
that skips what is already written and equals an uninterrupted one."""

import json

import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.offline_batch import (BatchFileError, done_indices, parse_line,
                                                read_lines, run_batch)
from trt_twotower.runtime.session import TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

DEFAULTS = GenerationSettings(max_new_tokens=8, block_size=4, steps_per_block=4,
                              stop_at_eos=False)


def encode(text):
    return [4 + ord(c) % 1000 for c in text]


def decode(ids):
    return " ".join(map(str, ids))


LINES = [
    {"id": "a", "prompt": "def f(x):"},
    {"prompt_ids": [5, 6, 7], "mode": "ar", "max_new_tokens": 5, "temperature": 0.7, "seed": 4},
    {"prompt": "x", "mode": "mock-ar", "max_new_tokens": 3},
    {"prompt": "y", "confidence_threshold": 2.0},
    {"prompt": "z", "prompt_ids": [4]},
    {"prompt": "w", "colour": "blue"},
    {"prompt_ids": list(range(4, 70))},
    {"id": 7, "prompt": "while True:", "steps_per_block": 2},
]


@pytest.fixture
def session(tiny_model):
    return TwoTowerSession(TorchContextExecutor(tiny_model), TorchDenoiserExecutor(tiny_model),
                           tiny_model.config, 64)


def _write_input(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in LINES) + "\n{not json\n")
    return path


def _run(session, path, out_path):
    lines = read_lines(path, DEFAULTS, encode)
    done = done_indices(out_path)
    with open(out_path, "a") as out:
        errors = run_batch(session, [l for l in lines if l.index not in done], out, decode,
                           in_flight=3)
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    return errors, {r["index"]: r for r in records}


def test_each_line_is_answered_with_its_own_settings_or_its_error(session, tmp_path):
    errors, records = _run(session, _write_input(tmp_path), tmp_path / "out.jsonl")
    assert sorted(records) == list(range(len(LINES) + 1))
    assert errors == 5
    assert "confidence_threshold" in records[3]["error"]
    assert "exactly one of prompt and prompt_ids" in records[4]["error"]
    assert "colour" in records[5]["error"]
    assert "maximum context" in records[6]["error"]
    assert "not JSON" in records[8]["error"]
    assert records[0]["id"] == "a" and len(records[0]["generated_ids"]) == 8
    assert len(records[1]["generated_ids"]) == 5 and records[1]["stats"]["context_steps"] == 5
    assert len(records[2]["generated_ids"]) == 3
    assert records[2]["stats"]["denoiser_evaluations"] == 3
    assert records[7]["id"] == 7 and records[7]["stats"]["denoiser_evaluations"] <= 4
    assert records[0]["text"] == decode(records[0]["generated_ids"])


def test_a_restarted_run_skips_written_lines_and_equals_an_uninterrupted_one(session,
                                                                              tmp_path):
    path = _write_input(tmp_path)
    _, full = _run(session, path, tmp_path / "full.jsonl")
    partial = tmp_path / "partial.jsonl"
    kept = [json.dumps(full[i]) for i in (1, 4)]
    partial.write_text("\n".join(kept) + "\n" + json.dumps(full[0])[:25])  # crashed mid-line
    assert done_indices(partial) == {1, 4}
    assert partial.read_text() == "\n".join(kept) + "\n"
    errors, resumed = _run(session, path, partial)
    assert len(partial.read_text().splitlines()) == len(LINES) + 1  # each line once
    for index, record in full.items():
        assert resumed[index].get("generated_ids") == record.get("generated_ids"), index
        assert resumed[index].get("error") == record.get("error"), index


def test_an_output_file_of_something_else_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("hello\nworld\n")
    with pytest.raises(BatchFileError, match="new --output"):
        done_indices(out)


def test_a_line_that_is_not_an_object_or_has_bad_ids_is_an_error_line():
    assert "JSON object" in parse_line(0, "[1, 2]", DEFAULTS, encode).error
    assert "list of integers" in parse_line(0, '{"prompt_ids": [1, "2"]}', DEFAULTS,
                                            encode).error
    line = parse_line(3, '{"prompt": "ab", "max_new_tokens": 4}', DEFAULTS, encode)
    assert line.request.prompt_ids == encode("ab") and line.request.settings.max_new_tokens == 4
    assert line.request.settings.block_size == DEFAULTS.block_size
