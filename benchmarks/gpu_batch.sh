#!/usr/bin/env bash
# Run several benchmark steps in one device call, each under its own time limit, and pack what
# they wrote into $OUT/${NAME}.tar.gz (the device returns at most 8 files).
#   bash benchmarks/gpu_batch.sh STEPS_FILE            (NAME defaults to "results")
#   NAME=gpu1 CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_batch.sh STEPS_FILE
# STEPS_FILE: one step a line, "SECONDS COMMAND..."; a command writes its JSON under $RES.
# Every step's output goes to $OUT/${NAME}_log.txt (log.txt for the default name); a step past its
# limit is stopped and the next runs. benchmarks/gpu_parallel.sh runs two such batches at once.
set -u
NAME=${NAME:-results}
LOG="$OUT/$([ "$NAME" = results ] && echo log || echo "${NAME}_log").txt"
. benchmarks/gpu_env.sh >>"$LOG" 2>&1 || exit 1
export RES=/tmp/res_$NAME && mkdir -p "$RES"
while read -r limit command; do
  [ -z "$limit" ] || [ "${limit:0:1}" = "#" ] && continue
  echo "=== [$(date +%T)] ($limit s) $command" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" bash -c "$command" >>"$LOG" 2>&1
  echo "=== exit $? at $(date +%T)" | tee -a "$LOG"
  tar -czf "$OUT/$NAME.tar.gz" -C "$RES" . 2>/dev/null
done <"$1"
tail -c 4000 "$LOG"
