"""The new families on the GPU kernels: random-init Phi-3, GPT-NeoX and gpt-oss models end to end.

    python benchmarks/families_check.py --lengths 4096 16384 --out $OUT/families_check.json      # GPU
    python benchmarks/families_check.py --device cpu --lengths 256 --block 16 --top-k 4 \\
        --hidden 64 --layers 2                                                                 # CPU smoke run

The tests (``tests/tl/test_families_joint_qkv.py``, ``tests/tl/test_families_gpt_oss.py``) check
each family on the CPU, where the torch references run. This runs the same families on CUDA,
where the Triton kernels run (fused qkv with partial rotary; learned sinks with a sliding window
on every other layer), at a model-like width and real lengths. Per family, length and dtype:

- ``nothing pruned``: ``top_k`` = every key block, against the HF model's own forward (up to
  ``--hf-max`` tokens: HF's eager attention builds T x T scores) and against the same model in
  ``mode="dense"``: max |logit difference| and top-1 agreement;
- ``pruned``: ``--estimator`` at ``--block`` / ``--top-k``: pruned fraction (global layers: a
  windowed layer keeps its band), next-token KL(dense || sparse) mean / max and top-1 agreement.

Random weights: the figures check that the kernels reproduce each family's attention, not how
much a trained model's output survives pruning (``docs/fidelity.md`` does that on real models).
Prints a table and writes JSON after every row.
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
from benchmarks.common import command, describe, environment, print_table, save_json  # noqa: E402
from benchmarks.real_model_check import next_token_figures  # noqa: E402

COLUMNS = ["family", "dtype", "length", "run", "top_k", "seconds", "max_abs_diff_vs_hf", "top1_vs_hf",
           "max_abs_diff_vs_dense_mode", "pruned_fraction_global_layers", "kl_mean", "kl_max", "top1_agreement",
           "error"]


def family_configs(hidden: int, layers: int, head_dim: int) -> dict:
    """Each family's transformers config at this width (GQA 4:1 where the family has it)."""
    import transformers

    heads = hidden // head_dim
    common = dict(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=131072)
    return {
        "phi3": transformers.Phi3Config(**common, intermediate_size=2 * hidden, num_key_value_heads=max(1, heads // 4),
                                        pad_token_id=0),
        "phi3-partial-rotary": transformers.Phi3Config(**common, intermediate_size=2 * hidden, pad_token_id=0,
                                                       num_key_value_heads=max(1, heads // 4),
                                                       partial_rotary_factor=0.75),
        "gpt-neox": transformers.GPTNeoXConfig(**common, intermediate_size=4 * hidden, rotary_pct=0.25),
        "gpt-oss": transformers.GptOssConfig(**common, intermediate_size=hidden, num_key_value_heads=max(1, heads // 4),
                                             head_dim=head_dim, num_local_experts=4, num_experts_per_tok=2,
                                             sliding_window=128),
    }


def random_hf(config, device: str, dtype: torch.dtype, seed: int = 0):
    """A random HF model with its sinks (where it has them) far from zero, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # a copy: from_hf_model sets the model's config to "sdpa", which gpt-oss refuses to be built with
    hf_model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype).eval()
    hf_model.config.architectures = [type(hf_model).__name__]
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("sinks"):
                param.copy_(2.0 * torch.randn_like(param))
    return hf_model.to(device)


def check(family: str, config, dtype: torch.dtype, length: int, args: argparse.Namespace) -> list[dict]:
    """The two rows (nothing pruned, pruned) of one family, dtype and length."""
    import sparse_lens as sl

    hf_model = random_hf(config, args.device, dtype)
    reference = copy.deepcopy(hf_model) if length <= args.hf_max else None
    model = sl.HookedSparseTransformer.from_hf_model(hf_model, None, model_name=f"random-{family}")
    tokens = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    tokens = tokens.to(args.device)
    n_blocks = -(-length // args.block)
    blocks = dict(query_block=args.block, key_block=args.block, sink_blocks=1, local_blocks=1)
    global_layers = [index for index, block in enumerate(model.blocks) if block.attn._sliding_window is None]
    base = {"family": family, "dtype": str(dtype).removeprefix("torch."), "length": length}
    model.stream = sl.TracingConfig(top_k=n_blocks, **blocks)
    with torch.no_grad():
        with model.stream_settings(mode="dense"):
            dense_logits = model(tokens)
        started = time.perf_counter()
        full_logits = model(tokens)
        full = {**base, "run": "nothing pruned", "top_k": n_blocks, "seconds": time.perf_counter() - started,
                "max_abs_diff_vs_dense_mode": float((full_logits - dense_logits).abs().max())}
        if reference is not None:
            hf_logits = reference(tokens).logits
            full.update(max_abs_diff_vs_hf=float((full_logits - hf_logits).abs().max()),
                        top1_vs_hf=float((full_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean()))
            del hf_logits, reference
        del full_logits
        model.stream = sl.TracingConfig(top_k=min(args.top_k, n_blocks), estimator=args.estimator, **blocks)
        started = time.perf_counter()
        sparse_logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        seconds = time.perf_counter() - started
    fractions = [cache[f"blocks.{layer}.attn.hook_pattern"].pruned_fraction() for layer in global_layers]
    pruned = {**base, "run": "pruned", "top_k": args.top_k, "estimator": args.estimator, "seconds": seconds,
              "pruned_fraction_global_layers": sum(fractions) / max(1, len(fractions)),
              **next_token_figures(dense_logits, sparse_logits)}
    return [full, pruned]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=None, help="default: all (phi3, phi3-partial-rotary, "
                        "gpt-neox, gpt-oss)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=1024, help="d_model (heads = hidden / head_dim)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--estimator", default="rescored")
    parser.add_argument("--hf-max", type=int, default=8192, help="compare with HF's own forward up to this length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.hidden % args.head_dim:
        parser.error("--hidden must be a multiple of --head-dim")

    configs = family_configs(args.hidden, args.layers, args.head_dim)
    families = args.families or list(configs)
    unknown = sorted(set(families) - set(configs))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(configs)}")
    rows: list[dict] = []
    for family in families:
        for dtype_name in args.dtypes:
            for length in args.lengths:
                try:
                    rows += check(family, configs[family], getattr(torch, dtype_name), length, args)
                except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
                    rows.append({"family": family, "dtype": dtype_name, "length": length, "error": describe(error)})
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                if args.out is not None:
                    save_json(args.out, {**environment(args.device, triton=args.device != "cpu"),
                                         "command": command("families_check.py"), "rows": rows})
    print_table(COLUMNS, [[_cell(row.get(name)) for name in COLUMNS] for row in rows])


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
