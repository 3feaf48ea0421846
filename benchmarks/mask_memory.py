"""HF's attention masks on a model with sliding-window layers: peak memory of a sparse forward
with the mask setting sparse_lens uses ("flash_attention_2": HF's mask function builds no T x T
tensor) against the previous one ("sdpa": a sliding layer's mask is a [1, 1, T, T] tensor once T
reaches the window).

    python3 benchmarks/mask_memory.py --lengths 32768 65536 --out $OUT/mask_memory.json          # GPU
    python3 benchmarks/mask_memory.py --device cpu --lengths 512 --hidden 64 --head-dim 16 \\
        --window 64 --block 16 --top-k 4                                                          # CPU smoke

A random-init Gemma 3 text model (``--layers``, Gemma 3's five sliding layers to one global one,
``--window`` tokens; width ``--hidden`` with 4 query heads and 1 KV head of ``--head-dim``),
last position's logits only. Per length and setting: peak GPU GiB (``torch.cuda.max_memory_allocated``,
weights included), seconds, and the largest difference of the last logits from the
"flash_attention_2" row (the setting must not change the result). On the CPU peak memory is not
measured (the smoke run checks the script). Prints a table and writes JSON after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    add_model_flags,
    add_stream_flags,
    build_model,
    cached_forward,
    command,
    environment,
    print_table,
    save_json,
    timed,
)

COLUMNS = ["length", "attn_implementation", "peak_gpu_gb", "seconds", "max_abs_diff_vs_flash_setting", "error"]
SETTINGS = ("flash_attention_2", "sdpa")  # the first is sparse_lens' (from_hf_model)


def gemma3_config(args: argparse.Namespace):
    """Gemma 3 text, random-init: every sixth layer global, the others sliding-window."""
    import transformers

    layer_types = ["full_attention" if (index + 1) % 6 == 0 else "sliding_attention" for index in range(args.layers)]
    return transformers.Gemma3TextConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=args.head_dim, sliding_window=args.window,
        layer_types=layer_types, max_position_embeddings=1 << 21)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    add_stream_flags(parser)
    add_model_flags(parser)
    args = parser.parse_args()

    import sparse_lens as sl

    stream = sl.TracingConfig(estimator=args.estimator, query_block=args.block, key_block=args.block,
                              top_k=args.top_k, keep_qk=False)
    model = build_model(gemma3_config(args), stream=stream, dtype=args.dtype, device=args.device,
                        mlp_chunk=args.mlp_chunk)
    hf_config = model.original_model.config
    assert hf_config._attn_implementation == SETTINGS[0], hf_config._attn_implementation
    result = {**environment(args.device), "command": command("mask_memory.py", "python3"), "config": vars(args)
              | {"out": str(args.out)}, "rows": []}
    table = []
    for length in args.lengths:
        tokens = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(length)).to(args.device)
        reference = None
        for setting in SETTINGS:
            hf_config._attn_implementation = setting
            row = timed(args.device, lambda: cached_forward(model, tokens)[0][0, -1].float().cpu(), key="logits")
            logits = row.pop("logits", None)
            if logits is not None and reference is None:
                reference = logits
            row |= {"length": length, "attn_implementation": setting,
                    "max_abs_diff_vs_flash_setting": None if logits is None or reference is None
                    else float((logits - reference).abs().max())}
            result["rows"].append(row)
            table.append([f"{row[column]:.4g}" if isinstance(row.get(column), float) else row.get(column, "")
                          for column in COLUMNS])
            if args.out:
                save_json(args.out, result)
        hf_config._attn_implementation = SETTINGS[0]
    print_table(COLUMNS, table)


if __name__ == "__main__":
    main()
