"""Offline batch inference: a JSONL file of prompts through the step loop, a JSONL file of
answers out, written as each request finishes, so a run that stops can be restarted and skips
what is already written.

Input lines are objects with ``prompt`` (text) or ``prompt_ids`` (token ids), an optional
``id``, and optional settings of their own (any ``GenerationSettings`` field but
``block_size``, which the run fixes). Output lines carry the input's line ``index`` and
``id``, the generated ids and text, and the request's stats, or an ``error`` for a line that
could not run.
"""

from __future__ import annotations

import dataclasses
import json
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from ..errors import TwoTowerError
from ..policy import GenerationError, GenerationSettings
from .cache import CacheFullError
from .rows import Request, RequestResult

LINE_SETTINGS = {f.name for f in dataclasses.fields(GenerationSettings)} - {"block_size"}


class BatchFileError(TwoTowerError, ValueError):
    """The input or output file cannot be used (not the file of one bad line)."""


@dataclass
class Line:
    index: int
    ident: Any
    request: Optional[Request] = None
    error: Optional[str] = None


def result_stats(result: RequestResult) -> dict:
    """A request's statistics as the CLI prints them, rounded for reading."""
    stats = result.stats
    return {
        "new_tokens": len(result.tokens), "denoiser_evaluations": stats.denoiser_evals,
        "tokens_per_evaluation": (round(result.tokens_per_eval, 3) if stats.denoiser_evals
                                  else None),
        "context_steps": stats.context_steps, "handoff_bytes": stats.handoff_bytes,
        "seconds": round(stats.seconds, 4),
        "prefill_seconds": round(stats.prefill_seconds, 4),
        "denoise_seconds": round(stats.denoise_seconds, 4),
        "commit_seconds": round(stats.commit_seconds, 4),
        "cancelled": result.cancelled,
    }


def parse_line(index: int, text: str, defaults: GenerationSettings,
               encode: Callable[[str], list[int]]) -> Line:
    """One input line as a request, or as the error that keeps it from running."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        return Line(index, None, error=f"line {index + 1} is not JSON: {err.msg}")
    if not isinstance(raw, dict):
        return Line(index, None, error=f"line {index + 1} must be a JSON object")
    line = Line(index, raw.get("id"))
    unknown = set(raw) - LINE_SETTINGS - {"id", "prompt", "prompt_ids"}
    if unknown:
        line.error = f"unknown field(s) {sorted(unknown)}"
    elif ("prompt" in raw) == ("prompt_ids" in raw):
        line.error = "give exactly one of prompt and prompt_ids"
    else:
        try:
            settings = dataclasses.replace(defaults, **{k: v for k, v in raw.items()
                                                        if k in LINE_SETTINGS})
            ids = (encode(raw["prompt"]) if isinstance(raw.get("prompt"), str)
                   else _ids(raw.get("prompt_ids", raw.get("prompt"))))
            line.request = Request(ids, settings)
        except (GenerationError, TypeError, ValueError) as err:
            line.error = str(err)
    return line


def _ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise ValueError("prompt_ids must be a list of integers (and prompt a string)")
    return value


def read_lines(path: Path, defaults: GenerationSettings, encode: Callable[[str], list[int]]
               ) -> list[Line]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BatchFileError(f"cannot read {path}: {err}") from err
    return [parse_line(i, line, defaults, encode)
            for i, line in enumerate(text.splitlines()) if line.strip()]


def done_indices(path: Path) -> set[int]:
    """The input lines an earlier run already answered. A last line cut short by a crash is
    dropped from the file, so the restarted run appends after complete lines only."""
    if not path.exists():
        return set()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BatchFileError(f"cannot read {path} to resume it: {err}") from err
    done, kept = set(), []
    for number, line in enumerate(text.splitlines(keepends=True)):
        try:
            record = json.loads(line)
            done.add(int(record["index"]))
            kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number != len(text.splitlines()) - 1:
                raise BatchFileError(f"{path} line {number + 1} is not an answer of this "
                                     "command; write to a new --output") from None
    path.write_text("".join(kept))
    return done


def write_record(out: TextIO, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def answer(line: Line, result: Optional[RequestResult], decode: Callable[[list[int]], str],
           error: Optional[str] = None) -> dict:
    record: dict = {"index": line.index, "id": line.ident}
    error = error or line.error
    if error is not None:
        record["error"] = error
        return record
    record.update(prompt_ids=line.request.prompt_ids, generated_ids=result.tokens,
                  text=decode(result.tokens), stats=result_stats(result))
    return record


def run_batch(session: Any, lines: list[Line], out: TextIO,
              decode: Callable[[list[int]], str], in_flight: int,
              on_answer: Callable[[dict], None] = lambda record: None) -> int:
    """Every line through ``session`` (a ``TwoTowerSession``), at most ``in_flight`` at once
    so the waiting queue stays short; each answer is written the moment its request ends.
    Returns how many lines ended in an error."""
    finished: "queue.Queue[tuple[Line, Any]]" = queue.Queue()
    pending, running, errors = list(reversed(lines)), 0, 0
    while pending or running:
        while pending and running < in_flight:
            line = pending.pop()
            if line.request is None:
                finished.put((line, None))
            else:
                try:
                    handle = session.submit(line.request)
                except (TwoTowerError, GenerationError, CacheFullError) as err:
                    line.error = str(err)
                    finished.put((line, None))
                else:
                    handle.add_done_callback(lambda h, line=line: finished.put((line, h)))
            running += 1
        line, handle = finished.get()
        running -= 1
        result, error = None, None
        if handle is not None:
            try:
                result = handle.result()
            except Exception as err:  # noqa: BLE001 - one failed request is one error line
                error = f"{type(err).__name__}: {err}"
        record = answer(line, result, decode, error)
        errors += "error" in record
        write_record(out, record)
        on_answer(record)
    return errors
