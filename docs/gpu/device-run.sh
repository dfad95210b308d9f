#!/usr/bin/env bash
# Calls on a lent GPU machine (docs/benchmarks.md, "GPU"): model benchmarks at sd15 and default size, live
# sessions, and training throughput of each stage. All the parts take about 1,000 s, more than one call's 600 s:
# split them over two calls, e.g. PARTS="bench bench-more live", then PARTS="compile train vae batch8". Results: $OUT/bench.jsonl, $OUT/stream.jsonl, $OUT/train.jsonl.
#
# Before the call, here:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0 diffusers==0.42.1
#   .venv/bin/emote corpus --out .whl/corpus --identities 20 --hours 0.04 --seed 0 --size 128 --workers 2
#   mv avatar/checkpoints/pixel avatar/checkpoints/pixel-teacher /tmp/   # and back after the call
# For PARTS "corpus" (the corpus written there, in about a tenth of the time on its 16 cores; espeak-ng is not on
# the device image, and its libpcaudio would need PulseAudio, so a stub stands in for it):
#   mkdir -p .whl/debs .whl/lib && (cd .whl/debs && apt-get download libespeak-ng1 espeak-ng-data libsonic0)
#   gcc -shared -fPIC -O2 -o .whl/lib/libpcaudio.so.0 docs/gpu/pcaudio_stub.c
# (session 17 checked that here, with the system's espeak-ng-data hidden: the same audio, byte for byte; it has not
# run on a GPU machine yet).
# The device image lacks diffusers and av; `.whl/` (ignored by git) carries them and the corpus. A call carries at
# most 64 MiB and the tracked tree is 69 MiB with the two checkpoints, which these runs do not need (--preset).
# The call (session 17): `OUT=$OUT bash docs/gpu/device-run.sh 2>&1 | tee $OUT/run.log` with carry [".whl"];
# PARTS picks sections (the second call: PARTS="bench train" TRAIN_STEPS=40 TRAIN_LIMIT=45); "corpus" (not in the
# default) writes a corpus there (CORPUS_IDENTITIES, CORPUS_HOURS) that the training parts then read.
# A dry run here, on the CPU: DEVICE=cpu QUICK=1 OUT=/tmp/gpu-out bash docs/gpu/device-run.sh
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-out}
QUICK=${QUICK:-0}
PARTS=${PARTS:-bench bench-more live compile train vae batch8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
  PY=python3
else
  PY=${PY:-.venv/bin/python}
fi
emote_within() {  # emote_within SECONDS ARGS...: the emote CLI (its package is not installed there), time-limited
  local limit=$1; shift
  timeout "$limit" "$PY" -c 'import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))' "$@"
}
record() {  # record FILE SECONDS ARGS...: emote's one JSON line appended to $OUT/FILE, or the error shown
  local file=$1 limit=$2; shift 2
  emote_within "$limit" "$@" >"$OUT/last.json" 2>"$OUT/last.err" && tee -a "$OUT/$file" <"$OUT/last.json" \
    || { echo "FAILED ($?): $*"; tail -3 "$OUT/last.err"; }
}
section() { echo "=== $* (t=$(( $(date +%s) - START ))s)"; }
START=$(date +%s)
BIG=sd15; REPEATS=9; SECONDS_LIVE=10; TRAIN_STEPS=${TRAIN_STEPS:-60}; TRAIN_LIMIT=${TRAIN_LIMIT:-90}
if [ "$QUICK" = 1 ]; then BIG=tiny; REPEATS=1; SECONDS_LIVE=2; TRAIN_STEPS=2; TRAIN_LIMIT=300; fi

section environment
{ nvidia-smi 2>/dev/null | head -15
  "$PY" -c "import torch, diffusers, transformers, accelerate, av; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'av', av.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda', 'cpus', __import__('os').cpu_count())"
} 2>&1 | tee "$OUT/env.txt"

DATA=.whl/corpus
if [[ " $PARTS " == *" corpus "* ]]; then
  section corpus
  mkdir -p /tmp/espeak && for f in .whl/debs/*.deb; do dpkg -x "$f" /tmp/espeak; done
  export LD_LIBRARY_PATH="$PWD/.whl/lib:/tmp/espeak/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ESPEAK_DATA_PATH=/tmp/espeak/usr/lib/x86_64-linux-gnu
  rm -rf /tmp/corpus
  emote_within 400 corpus --out /tmp/corpus --seed 0 --size 128 --identities "${CORPUS_IDENTITIES:-200}" \
    --hours "${CORPUS_HOURS:-0.6}" --workers $(( $(nproc) > 2 ? $(nproc) - 2 : 1 )) 2>&1 | tail -2 && DATA=/tmp/corpus
fi

bench() {  # bench SECONDS ARGS...: one JSON line into bench.jsonl, or the error
  local limit=$1; shift
  section bench "$@"
  record bench.jsonl "$limit" bench --device "$DEVICE" --repeats "$REPEATS" --json "$@"
}
if [[ " $PARTS " == *" bench "* ]]; then
bench 120 --preset $BIG --dtype bfloat16 --steps 1
bench 120 --preset $BIG --dtype bfloat16 --steps 2
fi
if [[ " $PARTS " == *" bench-more "* ]]; then
bench 120 --preset $BIG --dtype bfloat16 --steps 4
bench 120 --preset $BIG --dtype float32 --steps 1
bench 40 --preset default --dtype bfloat16 --steps 1
bench 40 --preset default --dtype float32 --steps 1
fi

if [[ " $PARTS " == *" live "* ]]; then
for sessions in 1 32 128; do
  section live sessions $sessions
  record stream.jsonl $(( SECONDS_LIVE * 4 + 40 )) bench --streaming --preset default --device "$DEVICE" \
    --dtype bfloat16 --sessions "$sessions" --seconds "$SECONDS_LIVE" --json
done
fi

train() {  # train STAGE BATCH EXTRA...: log lines into train.jsonl; the model stays in /tmp/train-STAGE
  local stage=$1 batch=$2; shift 2
  section train "$stage" batch "$batch"
  rm -rf "/tmp/train-$stage"
  local command=(train --stage "$stage")
  [ "$stage" = distill ] && command=(distill)
  emote_within "$TRAIN_LIMIT" "${command[@]}" --data "$DATA" --out "/tmp/train-$stage" --steps "$TRAIN_STEPS" \
    --batch-size "$batch" --mixed-precision bf16 --log-every 10 --num-workers 6 --save-every "$TRAIN_STEPS" --quiet \
    "$@" >"$OUT/last.err" 2>&1 || { echo "stopped ($?)"; tail -3 "$OUT/last.err"; }
  sed "s/^{/{\"run\": \"$stage-b$batch\", /" "/tmp/train-$stage/log.jsonl" 2>/dev/null | tee -a "$OUT/train.jsonl" | tail -2
}
if [[ " $PARTS " == *" compile "* ]]; then
  bench 150 --preset default --dtype bfloat16 --steps 1 --compile reduce-overhead
fi

if [[ " $PARTS " == *" train "* ]]; then
  [[ " $PARTS " == *" vae "* ]] && train vae 64 --preset default
  train 1 64 --preset default
  train 2 64 --init /tmp/train-1/model
  train distill 64 --teacher /tmp/train-2/model --num-inference-steps 1
  train warm 64 --init /tmp/train-distill/model
  [[ " $PARTS " == *" batch8 "* ]] && train 2 8 --init /tmp/train-1/model
fi

if [[ " $PARTS " == *" compile "* ]]; then
bench 200 --preset $BIG --dtype bfloat16 --steps 1 --compile default
fi
rm -f "$OUT/last.json" "$OUT/last.err"
section done
