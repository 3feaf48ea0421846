"""What the fused layers of chunked forwards change (``sparse_lens.tl.fused_layers``, the RoPE kernel).

    python3 benchmarks/fused_layers_check.py --out $OUT/fused_layers_check.json

A random-init Qwen2.5-1.5B-shaped model (``--layers`` layers, bf16) run twice on the same
``--length`` tokens: with the default chunking (``mlp_chunk_tokens`` 65,536: fused RMSNorm, the
SiLU-and-product kernel, the RoPE kernel) and with ``mlp_chunk_tokens=None`` (every layer as HF
runs it over the whole sequence). Dense mode (no selection): the largest difference of the last
position's logits, and of the final residual stream (``ln_final.hook_in``) over all positions, in
units of its largest magnitude. Sparse mode (the default estimator): the share of (layer, head,
query block) rows whose kept blocks are identical in both runs (a near-tie flipped by one rounding
changes a row, and from there the next layers' inputs). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_model, command, environment, print_table, save_json  # noqa: E402


def run(model, tokens, chunk, mode):
    model.mlp_chunk_tokens = chunk
    with torch.no_grad(), model.stream_settings(mode=mode):
        logits, cache = model.run_with_cache(
            tokens, logits_to_keep=1,
            names_filter=lambda name: name == "ln_final.hook_in" or name.endswith("hook_block_indices"))
    return logits, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_layers_check.json"))
    args = parser.parse_args()
    model = build_model("qwen2.5-1.5b", layers=args.layers, dtype=args.dtype, device=args.device)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    rows = []
    for mode in ("dense", "sparse"):
        fused_logits, fused = run(model, tokens, 65536, mode)
        plain_logits, plain = run(model, tokens, None, mode)
        residual_fused, residual_plain = fused["ln_final.hook_in"].float(), plain["ln_final.hook_in"].float()
        row = {"mode": mode, "length": args.length,
               "logits_max_abs_diff": (fused_logits.float() - plain_logits.float()).abs().max().item(),
               "logits_max_abs": plain_logits.float().abs().max().item(),
               "residual_max_rel_diff": ((residual_fused - residual_plain).abs().max()
                                         / residual_plain.abs().max()).item(),
               "residual_share_identical": (residual_fused == residual_plain).float().mean().item()}
        names = [name for name in plain.keys() if name.endswith("hook_block_indices")]
        if names:
            same = [(fused[name] == plain[name]).all(-1).float().mean().item() for name in names]
            row["rows_identical_per_layer"] = same
        rows.append(row)
        print(row, flush=True)
        del fused, plain
    save_json(args.out, {"command": command("fused_layers_check.py", "python3"), **environment(args.device),
                         "layers": args.layers, "rows": rows})
    print_table(["mode", "T", "logits max |diff|", "logits max |value|", "residual max rel diff",
                 "residual identical", "kept rows identical per layer"],
                [[r["mode"], f"{r['length']:,}", f"{r['logits_max_abs_diff']:.4f}", f"{r['logits_max_abs']:.2f}",
                  f"{r['residual_max_rel_diff']:.2e}", f"{r['residual_share_identical']:.4f}",
                  " ".join(f"{s:.4f}" for s in r.get("rows_identical_per_layer", [])) or "-"] for r in rows])


if __name__ == "__main__":
    main()
