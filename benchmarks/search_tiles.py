"""Launch sweep of Stream's search kernel on one GPU (issue 11: the default's wide search is its cost).

    python3 benchmarks/search_tiles.py --out $OUT/search_tiles.json
    python3 benchmarks/search_tiles.py --lengths 131072 1048576 --launches 4:3 8:3 --selects rank

``stream_triton`` at Stream's own width (``top_k`` 16) and at the default's wide one (beam 4: 58
slots), for every combination of: the score tile's orientation (``KEY_MAJOR``: keys x queries;
else queries x keys), ``num_warps:num_stages`` and the
selection (``rank`` / ``sort``). One layer of random bf16 q / k of the Qwen2.5-1.5B shape (12 query
heads, 2 key heads, d_head 128), 64-token blocks, sink 1, local 1, 8 representative keys; dense
cuDNN SDPA on the same tensors timed in the same run (the ratio's baseline). Every setting's blocks
are compared with the package's default launch (``same``: share of identical rows; scores summed in
another order can flip a near-tied row). A launch that does not fit the GPU is recorded with its
error. CUDA-event medians. Prints a table, writes JSON. ``--rescore`` sweeps the fused rescoring
(``rescore_triton``, top-k mode) of the wide search's candidates instead: every tile masked
(``MASK_ALL``), the GQA group's heads side by side (``HEADS_INNER``), ``num_warps:num_stages``; every
query and every 4th; for each ``--beams`` width (default 4: 58 slots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import attention_heads, command, dense_sdpa, describe, environment, print_table, save_json, time_cuda  # noqa: E402
from sparse_lens.kernels import rescore_triton, stream_triton  # noqa: E402
from sparse_lens.kernels.blocks import num_blocks  # noqa: E402

BLOCK, SINK, LOCAL, REPRESENTATIVE_KEYS, TOP_K, BEAM = 64, 1, 1, 8, 16, 4
WIDE_TOP_K = SINK + LOCAL + BEAM * (TOP_K - SINK - LOCAL)  # the default's wide search: 58 slots


def search(query, key, top_k: int, select: str, tuning: dict | None):
    out = torch.empty(*query.shape[:2], num_blocks(query.shape[2], BLOCK), top_k, dtype=torch.int64, device="cuda")
    stream_triton._launch_into(query, key, out, query_block=BLOCK, key_block=BLOCK, top_k=top_k, sink_blocks=SINK,
                               local_blocks=LOCAL, representative_keys=REPRESENTATIVE_KEYS, expand_levels=0,
                               select=select, tuning=tuning)
    return out


def rescore(query, key, candidates, query_stride: int, tuning: dict | None):
    out = torch.empty(*candidates.shape[:3], TOP_K, dtype=torch.int64, device="cuda")
    rescore_triton._launch(query, key, candidates, out, mode=rescore_triton.MODE_TOP_K, query_block=BLOCK,
                           key_block=BLOCK, scale=query.shape[-1] ** -0.5, query_stride=query_stride,
                           sink_blocks=SINK, local_blocks=LOCAL, tuning=tuning)
    return out


def measure(name: str, run, reference: torch.Tensor, dense_s: float, repeats: int) -> dict:
    row = {"kernel": name}
    try:
        same = (run() == reference).all(-1).float().mean().item()
        seconds = time_cuda(run, repeats)
    except Exception as error:  # noqa: BLE001 - a launch that does not fit is a result of the sweep
        row["error"] = describe(error)
        torch.cuda.empty_cache()
        return row
    row.update(ms=seconds * 1e3, share_of_dense=seconds / dense_s, same=same)
    return row


def sweep_search(query, key, launches, selects, dense_s: float, repeats: int, seq_len: int) -> list[dict]:
    """Stream's search at its own width and the wide one: the package's launch, then every
    orientation x selection x launch."""
    rows = []
    for top_k in (TOP_K, WIDE_TOP_K):
        reference = search(query, key, top_k, "rank", None)
        rows.append({**measure(f"search top_k {top_k}", lambda: search(query, key, top_k, "rank", None), reference,
                               dense_s, repeats), "seq_len": seq_len, "setting": "package default"})
        print(rows[-1], flush=True)
        for key_major in (False, True):
            for select in selects:
                for warps, stages in launches:
                    tuning = {"KEY_MAJOR": key_major, "num_warps": warps, "num_stages": stages}
                    row = measure(f"search top_k {top_k}", lambda: search(query, key, top_k, select, tuning),
                                  reference, dense_s, repeats)
                    setting = f"{'keys x queries' if key_major else 'queries x keys'}, {select}, {warps} warps, {stages} stages"
                    rows.append({**row, "seq_len": seq_len, "setting": setting, "select": select, **tuning})
                    print(rows[-1], flush=True)
    return rows


def sweep_rescoring(query, key, launches, dense_s: float, repeats: int, seq_len: int, beam: int) -> list[dict]:
    """The fused rescoring (top-k mode) of a wide search's candidates (``beam`` x the branches), per
    launch and query stride."""
    width = SINK + LOCAL + beam * (TOP_K - SINK - LOCAL)
    candidates = search(query, key, width, "rank", None)
    candidates = candidates.to(torch.int32).contiguous()
    rows = []
    for stride in (1, 4):
        reference = rescore(query, key, candidates, stride, None)
        tunings = [None, {"MASK_ALL": True}, {"HEADS_INNER": True}] + [
            {"num_warps": warps, "num_stages": stages, "HEADS_INNER": heads_inner}
            for warps, stages in launches for heads_inner in (False, True)]
        for tuning in tunings:
            row = measure(f"rescore {width} slots, every {stride} query", lambda: rescore(query, key, candidates, stride, tuning),
                          reference, dense_s, repeats)
            setting = "package default" if tuning is None else ", ".join(f"{k}={v}" for k, v in tuning.items())
            rows.append({**row, "seq_len": seq_len, "setting": setting, **(tuning or {})})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--launches", nargs="+", default=["4:3", "8:3", "8:2"], help="num_warps:num_stages")
    parser.add_argument("--selects", nargs="+", default=["rank", "sort"], choices=["rank", "sort"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rescore", action="store_true",
                        help="sweep the fused rescoring (num_warps:num_stages, every query and every 4th) instead")
    parser.add_argument("--beams", type=int, nargs="+", default=[BEAM],
                        help="--rescore: the wide search's widths (beam x the branches) whose candidates are rescored")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_tiles.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("search_tiles.py times the Triton kernels on a GPU; this machine has no CUDA device.")
    launches = [tuple(int(part) for part in spec.split(":")) for spec in args.launches]
    q_heads, kv_heads, d_head = attention_heads("qwen2.5-1.5b")
    rows = []
    for seq_len in args.lengths:
        generator = torch.Generator(device="cuda").manual_seed(0)
        query, key, value = (torch.randn(1, heads, seq_len, d_head, device="cuda", dtype=torch.bfloat16,
                                         generator=generator) for heads in (q_heads, kv_heads, kv_heads))
        dense_s = time_cuda(lambda: dense_sdpa(query, key, value), 5)
        rows.append({"kernel": "dense SDPA", "seq_len": seq_len, "ms": dense_s * 1e3, "share_of_dense": 1.0})
        print(rows[-1], flush=True)
        if args.rescore:
            for beam in args.beams:
                rows += sweep_rescoring(query, key, launches, dense_s, args.repeats, seq_len, beam)
        else:
            rows += sweep_search(query, key, launches, args.selects, dense_s, args.repeats, seq_len)
        del query, key, value
        torch.cuda.empty_cache()
    print_table(["kernel", "T", "setting", "ms", "/ dense", "same rows", "error"],
                [[r["kernel"], f"{r['seq_len']:,}", r.get("setting", ""), f"{r['ms']:.2f}" if "ms" in r else "-",
                  f"{100 * r['share_of_dense']:.2f}%" if "share_of_dense" in r else "-",
                  f"{r['same']:.4f}" if "same" in r else "-", r.get("error", "")] for r in rows])
    save_json(args.out, {"command": command("search_tiles.py", "python3"), **environment("cuda"), "rows": rows})


if __name__ == "__main__":
    main()
