"""What an engine holds, read from the builder's DETAILED log instead of the engine itself.

Deserialising a plan needs a GPU (tensorrt-rtx-notes §5), so the build keeps the log and this
module condenses it into a summary saved beside the engine: the I/O tensors with their dtypes
and per-profile shapes as TensorRT compiled them, the engine's layers by kind, its kernels and
its memory. ``inspect`` prints it and the tests hold it against ``names.graph_io``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

SUMMARY_SUFFIX = ".summary.json"

# The log's dtype words, in the names ``trt_twotower.names`` and the manifest use.
LOG_DTYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Int64": "int64",
              "Int32": "int32", "Bool": "bool", "Int8": "int8", "FP8": "float8"}

IO_LINE = re.compile(r"^ Name: (?P<name>[^,]+), IOMode: (?P<mode>Input|Output), "
                     r"DataType: (?P<dtype>\w+), Dimensions: \[(?P<dims>[-\d,]*)\]")
PROFILE = re.compile(r"MinShape: \[([-\d,]*)\], OptShape: \[([-\d,]*)\], MaxShape: \[([-\d,]*)\]")
LAYER_LINE = re.compile(r"^Name: .*?, LayerType: (?P<type>\w*), .*?TacticName: (?P<tactic>[^,]*),")
TACTIC_HASH = re.compile(r"_0x[0-9a-f]{8,}.*$")
MEMORY = re.compile(r"^Total (Activation|Weights) Memory: (\d+) bytes")
GENERATION = re.compile(r"^Engine generation completed in ([\d.]+) seconds")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def summarize(lines: list[str], top: int = 8) -> dict:
    """The engine as the builder reported it (a DETAILED log, one message per item)."""
    io, layer_types, kernels = [], Counter(), Counter()
    memory = {"activation_bytes": 0, "weights_bytes": 0}
    seconds = None
    for message in lines:
        for line in message.splitlines():
            if m := IO_LINE.match(line):
                io.append({"name": m["name"], "mode": m["mode"].lower(),
                           "dtype": LOG_DTYPES.get(m["dtype"], m["dtype"]),
                           "dims": _dims(m["dims"]),
                           "profiles": [[_dims(a), _dims(b), _dims(c)]
                                        for a, b, c in PROFILE.findall(line)]})
            elif m := LAYER_LINE.match(line):
                layer_types[m["type"] or "other"] += 1
                tactic = TACTIC_HASH.sub("", m["tactic"].strip())
                if tactic:
                    kernels[tactic] += 1
            elif m := MEMORY.match(line):
                key = f"{m[1].lower()}_bytes"
                memory[key] = max(memory[key], int(m[2]))
            elif m := GENERATION.match(line):
                seconds = float(m[1])
    return {"engine_layers": sum(layer_types.values()), "layer_types": dict(layer_types),
            "kernels": dict(kernels.most_common(top)),
            "fused_attention": sorted(k for k in kernels if "_mha_" in k),
            "io": io, **memory, "engine_generation_seconds": seconds}


def write_summary(path: Path, lines: list[str]) -> dict:
    summary = summarize(lines)
    Path(path).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_summary(path: Path) -> dict | None:
    """The saved summary, or None where a build left none (or it is unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
