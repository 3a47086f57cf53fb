#!/usr/bin/env bash
# NVIDIA AIPerf against `trt-twotower serve`'s OpenAI-compatible API: streamed completions at
# each concurrency, once per TwoTower mode (sent as the extra body field `mode`).
#
#   bash bench/aiperf/run.sh                       # a server already on 127.0.0.1:9000
#   CONCURRENCIES=1 REQUESTS=4 MODES=diffusion bash bench/aiperf/run.sh     # a smoke run
#
# AIPerf goes in a virtualenv of its own (it pins its own transformers and tokenizers):
#   python3 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf
#   AIPERF=/tmp/aiperf-venv/bin/aiperf bash bench/aiperf/run.sh
#
# Settings (environment): URL, MODEL (--served-model-name), TOKENIZER (a directory with the
# checkpoint's tokenizer.json; default: the built-in model's), MODES, CONCURRENCIES, REQUESTS
# (per run; default 4 x concurrency, at least 16), ISL/OSL (prompt and output tokens), OUT
# (default out/aiperf/<time>, which git ignores).
set -euo pipefail
cd "$(dirname "$0")/../.."

AIPERF=${AIPERF:-aiperf}
URL=${URL:-http://127.0.0.1:9000}
MODEL=${MODEL:-twotower}
TOKENIZER=${TOKENIZER:-$PWD/trt_twotower/builtin/model}
MODES=${MODES:-diffusion ar}
CONCURRENCIES=${CONCURRENCIES:-1 16 64}
ISL=${ISL:-128}
OSL=${OSL:-64}  # a multiple of the block size (16): diffusion generates whole blocks
OUT=${OUT:-out/aiperf/$(date -u +%Y%m%dT%H%M%SZ)}

if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  echo "TOKENIZER=$TOKENIZER has no tokenizer.json (use the served checkpoint's directory)" >&2
  exit 1
fi
if ! curl -sf "$URL/health" > /dev/null; then
  echo "nothing answers at $URL/health: start \`trt-twotower serve\` first" >&2
  exit 1
fi

for mode in $MODES; do
  for concurrency in $CONCURRENCIES; do
    requests=${REQUESTS:-$(( concurrency * 4 > 16 ? concurrency * 4 : 16 ))}
    # HF_HUB_OFFLINE stays unset: AIPerf's offline path looks the tokenizer up in the Hub cache
    # only, while a directory loads with no network either way.
    env -u HF_HUB_OFFLINE "$AIPERF" profile \
      --model "$MODEL" --url "$URL" --endpoint-type completions --streaming \
      --tokenizer "$TOKENIZER" --use-server-token-count \
      --extra-inputs "mode:$mode" \
      --concurrency "$concurrency" --request-count "$requests" \
      --warmup-request-count "$concurrency" \
      --isl "$ISL" --isl-stddev 0 --osl "$OSL" --osl-stddev 0 \
      --random-seed 0 --ui none --no-gpu-telemetry \
      --artifact-dir "$OUT/$mode-c$concurrency"
  done
done
echo "artifacts: $OUT"
