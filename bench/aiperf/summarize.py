"""One markdown table from the artifacts of ``bench/aiperf/run.sh``: per mode and concurrency,
AIPerf's time to first token, inter-chunk latency, output token throughput and request
throughput, with the requests that failed.

    python bench/aiperf/summarize.py out/aiperf/<time>   # prints the table
"""

import json
import re
import sys
from pathlib import Path

RUN = re.compile(r"^(?P<mode>[\w-]+)-c(?P<concurrency>\d+)$")


def row(run: Path) -> dict:
    found = RUN.match(run.name)
    data = json.loads((run / "phases" / "profiling" / "profile_export_aiperf.json").read_text())
    return {"mode": found["mode"], "concurrency": int(found["concurrency"]),
            "requests": int(data["request_count"]["avg"]),
            "errors": sum(e.get("count", 1) for e in data.get("error_summary") or []),
            "ttft": data["time_to_first_token"], "chunk": data["inter_chunk_latency"],
            "tokens": data["output_token_throughput"]["avg"],
            "rps": data["request_throughput"]["avg"]}


def table(rows: list[dict]) -> str:
    lines = ["| mode | concurrency | requests | errors | TTFT p50 / p99 (ms) | "
             "inter-chunk p50 / p99 (ms) | output tok/s | req/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["concurrency"])):
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['ttft']['p50']:.1f} / {r['ttft']['p99']:.1f} | "
                     f"{r['chunk']['p50']:.1f} / {r['chunk']['p99']:.1f} | "
                     f"{r['tokens']:.1f} | {r['rps']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    runs = [p for p in sorted(Path(sys.argv[1]).iterdir()) if RUN.match(p.name)]
    print(table([row(p) for p in runs]))
