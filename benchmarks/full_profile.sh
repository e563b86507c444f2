#!/usr/bin/env bash
# Every GPU full profile, one after another: device checks, speed, WikiText-2 quality, decoding.
#
#   bash benchmarks/full_profile.sh                          # from the repository root, on a GPU machine
#   DATA_DIR=/data STAGE_SECONDS="60 150 290 100" bash benchmarks/full_profile.sh
#
# DATA_DIR holds wikitext-2/ (default ../shared/data). STAGE_SECONDS, when set, bounds each of the four
# stages in seconds (for a machine lent for a fixed time; 0: unbounded, "skip": not run): each script
# writes its JSON after every length or variant, so a stage stopped at its bound still leaves what it
# measured, marked "complete": false. RESULTS_COPY, when set, is a folder the result files are copied
# into at the end. Extra arguments for a stage: SPEED_ARGS, QUALITY_ARGS, GENERATION_ARGS.
#
# The prepared 8-minute run for a lent GPU (docs/benchmarks.md, GPU section): here,
#   mkdir -p .devdata && cp -r ../shared/data/wikitext-2 .devdata/
# then on the device, carrying .devdata:
#   DATA_DIR=.devdata RESULTS_COPY=$OUT STAGE_SECONDS="60 200 200 skip" \
#   SPEED_ARGS="--modes eager compiled --targets body --lengths 1024 4096 16384 --variants baseline chiar-threshold --rounds 3" \
#   QUALITY_ARGS="--variants baseline chiar-threshold chiar-random chiar-3op" bash benchmarks/full_profile.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA_DIR=${DATA_DIR:-../shared/data}
read -r -a LIMITS <<< "${STAGE_SECONDS:-0 0 0 0}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

stage() {  # stage SECONDS COMMAND...: run it, bounded when SECONDS > 0; never stop the whole run
  local seconds=$1; shift
  if [ "$seconds" = skip ]; then echo "=== skipped: $*"; return; fi
  echo "=== $(date -u +%T) $*"
  if [ "$seconds" -gt 0 ]; then timeout --signal=INT --kill-after=10 "$seconds" "$@"; else "$@"; fi
  echo "=== exit $? after ${SECONDS}s in all"
}

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
stage "${LIMITS[0]}" python3 benchmarks/device_check.py --output "$RESULTS/device-check-cuda.json"
stage "${LIMITS[1]}" python3 benchmarks/speed.py --profile full ${SPEED_ARGS:-}
stage "${LIMITS[2]}" python3 benchmarks/quality.py --profile full --seeds 0 --data_dir "$DATA_DIR" ${QUALITY_ARGS:-}  # one seed fits the device time
stage "${LIMITS[3]}" python3 benchmarks/generation.py --profile full ${GENERATION_ARGS:-}

for result in "$RESULTS"/speed-cuda.json "$RESULTS"/generation-cuda.json; do
  [ -f "$result" ] && python3 benchmarks/plot_speed.py "$result"
done

if [ -n "${RESULTS_COPY:-}" ]; then
  cp "$RESULTS"/device-check-cuda.json "$RESULTS"/speed-cuda.json "$RESULTS"/generation-cuda.json \
     "$RESULTS"/speed-cuda.png "$RESULTS"/generation-cuda.png \
     "$RESULTS"/quality-wikitext-full*.json "$RESULTS"/quality-wikitext-full*.png "$RESULTS_COPY"/ 2>/dev/null
  ls -la "$RESULTS_COPY"
fi
