"""Thought anchors of a chain of thought the default model writes itself (CPU), sparse against dense.

    python benchmarks/thought_anchors_cot.py --problem field_trip --min-new-tokens 1000 --max-new-tokens 1200 \
        --repetition-penalty 1.1 --no-repeat-ngram-size 6 --budget 16:16 --budget 16:32 --budget 8:32 \
        --threads 1 --out benchmarks/results/thought_anchors_cot_smollm2.json

1. The model (SmolLM2-135M-Instruct, offline) writes a chain of thought for a shipped word problem:
   greedy, chat template, dense prefill, KV-cached decode (``generate_chain_of_thought``), with
   a repetition penalty and no repeated 6-grams (plain greedy decoding makes the 135M model
   repeat one sentence until the token budget); with ``--min-new-tokens`` an early end of turn is
   replaced by "Wait," (then other openers in turn: budget forcing) until the text is that long.
   Its speed is reported in tokens per second (prefills of every round included). ``--written`` uses the problem's written chain of
   thought instead (``field_trip`` has one).
2. The text is read back after the prompt (``tokenize_chain_of_thought``) and cut into sentences.
3. Per budget (``BLOCK:TOP_K``, query and key blocks equal, 1 sink and 2 local blocks): one
   observe-mode run (dense attention, the estimate recorded), the thought anchors by ``block_mass``
   (``sparse``) and by the kept cells' token weights (``sparse_tokens``), and once the dense
   reference. Spearman of the saliences, receiver heads shared (of 20), top-5 anchors shared.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


CONTINUATIONS = ("Wait,", "Let me check this another way.", "Hmm,", "Actually,")


def parse_budget(text: str) -> tuple[int, int]:
    block, top_k = text.split(":")
    return int(block), int(top_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="field_trip")
    parser.add_argument("--max-new-tokens", type=int, default=1200)
    parser.add_argument("--min-new-tokens", type=int, default=1000, help="budget forcing (0: the model's own end)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=6)
    parser.add_argument("--written", action="store_true", help="analyse the problem's written chain of thought")
    parser.add_argument("--budget", action="append", type=parse_budget, help="BLOCK:TOP_K (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is much faster on a loaded CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/thought_anchors_cot_smollm2.json"))
    args = parser.parse_args()
    budgets = args.budget or [(16, 16), (16, 32), (8, 32)]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import sparse_lens as sl
    from sparse_lens.analysis.thought_anchors import (
        compare_anchors,
        generate_chain_of_thought,
        thought_anchors,
        tokenize_chain_of_thought,
    )
    from sparse_lens.data import WORD_PROBLEMS

    problem = WORD_PROBLEMS[args.problem]
    started = time.perf_counter()
    model = sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL)
    report: dict = {"model": sl.DEFAULT_MODEL, "problem": problem.name, "question": problem.question,
                    "expected_answer": problem.answer, "torch_threads": torch.get_num_threads(),
                    "load_seconds": time.perf_counter() - started}

    if args.written:
        text, generation = problem.chain_of_thought, None
    else:
        started, cpu = time.perf_counter(), time.process_time()
        text = generate_chain_of_thought(model, problem.question, max_new_tokens=args.max_new_tokens,
                                         min_new_tokens=args.min_new_tokens, continuation=CONTINUATIONS,
                                         repetition_penalty=args.repetition_penalty,
                                         no_repeat_ngram_size=args.no_repeat_ngram_size)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        n_new = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        generation = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
                      "continuations": CONTINUATIONS, "repetition_penalty": args.repetition_penalty,
                      "no_repeat_ngram_size": args.no_repeat_ngram_size,
                      "forced_continuations": sum(text.count("\n\n" + c) for c in CONTINUATIONS), "new_tokens": n_new, "seconds": seconds,
                      "cpu_seconds": cpu_seconds, "tokens_per_second": n_new / seconds,
                      "contains_answer": problem.answer in text}
        print(f"generated {n_new} tokens in {seconds:.0f} s ({n_new / seconds:.2f} tokens/s, "
              f"{cpu_seconds:.0f} s CPU); answer {problem.answer!r} in text: {generation['contains_answer']}")
    chain = tokenize_chain_of_thought(model.tokenizer, text, problem.question)
    report.update(chain_of_thought=text, written=args.written, generation=generation, n_tokens=chain.n_tokens,
                  n_prompt_tokens=chain.sentences.token_spans[0][0], n_sentences=len(chain.sentences),
                  distinct_sentences=len(set(chain.sentences.texts)))
    print(f"{chain.n_tokens} tokens ({report['n_prompt_tokens']} before the first sentence), "
          f"{len(chain.sentences)} sentences ({report['distinct_sentences']} distinct)")

    rows, dense = [], None
    for block, top_k in budgets:
        budget = dict(query_block=block, key_block=block, top_k=top_k, sink_blocks=1, local_blocks=2)
        started = time.perf_counter()
        with torch.no_grad(), model.stream_settings(**budget, mode="observe", keep_qk=True) as stream:
            _, cache = model.run_with_cache(chain.tokens(), names_filter=lambda name: name.endswith("hook_pattern"))
        run_seconds = time.perf_counter() - started
        patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]
        if dense is None:
            started = time.perf_counter()
            dense = thought_anchors(patterns, chain.sentences, method="dense")
            report["dense"] = {"seconds": time.perf_counter() - started,
                               "receiver_heads": [list(head) for head in dense.receiver_heads],
                               "anchors": [{"sentence": i, "salience": float(dense.salience[i]),
                                            "text": chain.sentences.texts[i]} for i in dense.anchors(5)]}
        for method in ("sparse", "sparse_tokens"):
            started = time.perf_counter()
            result = thought_anchors(patterns, chain.sentences, method=method)
            seconds = time.perf_counter() - started
            agreement = compare_anchors(result, dense)
            rows.append({"query_block": block, "key_block": block, "top_k": top_k, "sink_blocks": 1, "local_blocks": 2,
                         "estimator": getattr(stream, "estimator", "stream"), "method": method,
                         "pruned_fraction": result.pruned_fraction, "spearman": agreement.spearman,
                         "receivers_shared": len(agreement.shared_receivers),
                         "receivers": len(dense.receiver_heads), "top5_anchors_shared": len(agreement.shared_anchors),
                         "observe_run_seconds": run_seconds, "aggregation_seconds": seconds,
                         "anchors": result.anchors(5)})
    report["rows"] = rows

    print(f"\n{'block':>5} {'top_k':>5} {'pruned':>6}  {'method':<13} {'Spearman':>8} {'receivers':>9} {'top-5':>5}")
    for row in rows:
        print(f"{row['query_block']:>5} {row['top_k']:>5} {row['pruned_fraction']:>6.3f}  {row['method']:<13} "
              f"{row['spearman']:>8.3f} {row['receivers_shared']:>4}/{row['receivers']:<4} {row['top5_anchors_shared']:>3}/5")
    print("\n" + dense.summary(chain.sentences.texts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
