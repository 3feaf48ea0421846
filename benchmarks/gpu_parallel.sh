#!/usr/bin/env bash
# Two step files at once, one per GPU of a two-GPU machine (each batch sees one GPU as cuda:0):
#   bash benchmarks/gpu_parallel.sh STEPS_GPU0 STEPS_GPU1
# Results: $OUT/gpu0.tar.gz, $OUT/gpu1.tar.gz and their logs $OUT/gpu{0,1}_log.txt.
set -u
. benchmarks/gpu_env.sh >/dev/null 2>&1 || exit 1  # install once, before the two batches start
# Half the host's cores each: torch's default thread count per process oversubscribes them when
# two CPU-heavy steps meet (thought anchors on the CPU beside pytest stalled past 180 s).
export OMP_NUM_THREADS=$(( $(nproc) / 2 ))
NAME=gpu0 CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_batch.sh "$1" >/dev/null &
NAME=gpu1 CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_batch.sh "$2" >/dev/null &
wait
tail -c 5000 "$OUT/gpu0_log.txt"; tail -c 5000 "$OUT/gpu1_log.txt"
