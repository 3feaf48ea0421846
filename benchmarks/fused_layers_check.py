"""What the fused layers of chunked forwards change (``sparse_lens.tl.fused_layers``, the RoPE kernel).

    python3 benchmarks/fused_layers_check.py --out $OUT/fused_layers_check.json

A random-init Qwen2.5-1.5B-shaped model (``--layers`` layers, bf16) run three times on the same
``--length`` tokens: ``plain``, ``mlp_chunk_tokens=None`` (every layer as HF runs it over the whole
sequence); ``chunked``, ``mlp_chunk_tokens = --chunk`` (65,536) with the fused layers switched off
(HF's norms and MLPs on each chunk: only the GEMMs' shapes differ); ``fused``, the same chunking
with the fused layers (fused RMSNorm, the SiLU-and-product kernel). Two comparisons per mode: ``chunked`` against ``plain`` (what chunking
alone changes) and ``fused`` against ``chunked`` (what the fused layers change). Dense mode (no
selection): the largest difference of the last position's logits, and of the final residual stream
(``ln_final.hook_in``) over all positions, in units of its largest magnitude, and the share of its
elements that are identical. Sparse mode (the default estimator): the same, and the share of (layer,
head, query block) rows whose kept blocks are identical in both runs (a near-tie flipped by one
rounding changes a row, and from there the next layers' inputs). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_model, command, environment, print_table, save_json  # noqa: E402
from sparse_lens.tl import chunking  # noqa: E402


def run(model, tokens, chunk, mode, fuse=True):
    """Logits of the last position and the cached residual / block indices; ``fuse=False`` keeps HF's
    norms and MLPs inside the chunks (the fused layers' probes return None: "not this form")."""
    model.mlp_chunk_tokens = chunk
    with torch.no_grad(), model.stream_settings(mode=mode), \
            mock.patch.object(chunking, "fused_rms_norm", chunking.fused_rms_norm if fuse else lambda *_: None), \
            mock.patch.object(chunking, "fused_gated_mlp", chunking.fused_gated_mlp if fuse else lambda *_: None):
        logits, cache = model.run_with_cache(
            tokens, logits_to_keep=1,
            names_filter=lambda name: name == "ln_final.hook_in" or name.endswith("hook_block_indices"))
    return logits, cache


def compare(mode: str, length: int, pair: str, new, old) -> dict:
    """How far run ``new`` (logits, cache) is from run ``old``."""
    (new_logits, new_cache), (old_logits, old_cache) = new, old
    residual_new, residual_old = new_cache["ln_final.hook_in"].float(), old_cache["ln_final.hook_in"].float()
    row = {"mode": mode, "length": length, "pair": pair,
           "logits_max_abs_diff": (new_logits.float() - old_logits.float()).abs().max().item(),
           "logits_max_abs": old_logits.float().abs().max().item(),
           "residual_max_rel_diff": ((residual_new - residual_old).abs().max() / residual_old.abs().max()).item(),
           "residual_share_identical": (residual_new == residual_old).float().mean().item()}
    names = [name for name in old_cache.keys() if name.endswith("hook_block_indices")]
    if names:
        row["rows_identical_per_layer"] = [(new_cache[name] == old_cache[name]).all(-1).float().mean().item()
                                           for name in names]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=65536,
                        help="positions per chunk of the chunked runs (below --length, or nothing is chunked)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_layers_check.json"))
    args = parser.parse_args()
    model = build_model("qwen2.5-1.5b", layers=args.layers, dtype=args.dtype, device=args.device)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    rows = []
    for mode in ("dense", "sparse"):
        plain = run(model, tokens, None, mode)
        chunked = run(model, tokens, args.chunk, mode, fuse=False)
        rows.append(compare(mode, args.length, "chunked vs plain", chunked, plain))
        print(rows[-1], flush=True)
        del plain
        fused = run(model, tokens, args.chunk, mode)
        rows.append(compare(mode, args.length, "fused vs chunked", fused, chunked))
        print(rows[-1], flush=True)
        del fused, chunked
    save_json(args.out, {"command": command("fused_layers_check.py", "python3"), **environment(args.device),
                         "layers": args.layers, "rows": rows})
    print_table(["mode", "T", "runs", "logits max |diff|", "logits max |value|", "residual max rel diff",
                 "residual identical", "kept rows identical per layer"],
                [[r["mode"], f"{r['length']:,}", r["pair"], f"{r['logits_max_abs_diff']:.4f}", f"{r['logits_max_abs']:.2f}",
                  f"{r['residual_max_rel_diff']:.2e}", f"{r['residual_share_identical']:.4f}",
                  " ".join(f"{s:.4f}" for s in r.get("rows_identical_per_layer", [])) or "-"] for r in rows])


if __name__ == "__main__":
    main()
