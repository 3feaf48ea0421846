#!/usr/bin/env bash
# Run several benchmark steps in one device call, each under its own time limit, and pack what
# they wrote into $OUT/results.tar.gz (the device returns at most 8 files).
#   bash benchmarks/gpu_batch.sh STEPS_FILE
# STEPS_FILE: one step a line, "SECONDS COMMAND..."; a command writes its JSON under $RES.
# Every step's output goes to $OUT/log.txt; a step past its limit is stopped and the next runs.
set -u
. benchmarks/gpu_env.sh || exit 1
export RES=/tmp/res && mkdir -p "$RES"
while read -r limit command; do
  [ -z "$limit" ] || [ "${limit:0:1}" = "#" ] && continue
  echo "=== [$(date +%T)] ($limit s) $command" | tee -a "$OUT/log.txt"
  timeout --signal=INT --kill-after=20 "$limit" bash -c "$command" >>"$OUT/log.txt" 2>&1
  echo "=== exit $? at $(date +%T)" | tee -a "$OUT/log.txt"
  tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null
done <"$1"
tail -c 6000 "$OUT/log.txt"
