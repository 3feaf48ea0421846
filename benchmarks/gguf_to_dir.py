"""Dequantise a GGUF model once into a Hugging Face directory, so that later runs load it in seconds.

    python3 benchmarks/gguf_to_dir.py /tmp/gemma-3-270m-q4_k_m.gguf /tmp/gemma3_270m

transformers' GGUF loader parses the file in Python and dequantises every tensor on each load
(Gemma 3 270M on the shared 2-core CPU: 41 s for the tokenizer, 76 s for the model), while a
``save_pretrained``-style directory loads in ~10 s (8 s tokenizer, 2 s model). The directory holds ``config.json`` (the GGUF
config without its ``quantization_config``: the weights are plain floats), the tokenizer files
and ``model.safetensors`` (``--dtype``, float32 by default, as ``from_pretrained`` dequantises).
The source is loaded by sparse_lens' own loader (``sparse_lens.tl.loading.load_hf_model``, so it
is also checked to be a supported family); the directory is then loaded back and compared with
it: every weight bit-equal, the same config, the same token ids for a sample text (else exit 1,
and nothing is left at OUT). Prints the seconds of each part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SAMPLE = "Attention sinks, sliding windows and 262,144 tokens: 3.14159 <b>bold</b> über naïve 東京"


def convert(source: str, out: Path, dtype: torch.dtype = torch.float32) -> dict:
    """Write ``source`` (anything ``from_pretrained`` takes) to ``out`` and check the copy; returns seconds."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_lens.tl.loading import load_hf_model, resolve_model_source

    seconds = {}
    started = time.perf_counter()
    hf_model, tokenizer = load_hf_model(resolve_model_source(source), dtype=dtype)
    seconds["load_source"] = time.perf_counter() - started
    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised floats now
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_model(hf_model, str(partial / "model.safetensors"))  # tied embeddings saved once
    seconds["save"] = time.perf_counter() - started
    started = time.perf_counter()
    copy = AutoModelForCausalLM.from_pretrained(partial, dtype=dtype)
    copy_tokenizer = AutoTokenizer.from_pretrained(partial)
    seconds["load_copy"] = time.perf_counter() - started
    problems = check_copy(hf_model, tokenizer, copy, copy_tokenizer)
    if problems:
        shutil.rmtree(partial)
        raise SystemExit("the saved copy differs from the source: " + "; ".join(problems))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return seconds


def check_copy(model, tokenizer, copy, copy_tokenizer) -> list[str]:
    """What differs between the source and its copy (empty: nothing): weights, config, token ids."""
    problems = []
    weights, copied = model.state_dict(), copy.state_dict()
    if weights.keys() != copied.keys():
        problems.append(f"weight names differ: {sorted(set(weights) ^ set(copied))[:4]}")
    else:
        problems += [f"weight {name} differs" for name in weights if not torch.equal(weights[name], copied[name])][:4]
    config, copied_config = model.config.to_dict(), copy.config.to_dict()
    problems += [f"config {key}: {config.get(key)!r} != {copied_config.get(key)!r}"
                 for key in sorted(set(config) | set(copied_config))
                 if key not in ("_name_or_path", "quantization_config") and config.get(key) != copied_config.get(key)]
    if tokenizer(SAMPLE)["input_ids"] != copy_tokenizer(SAMPLE)["input_ids"]:
        problems.append("token ids of the sample text differ")
    if getattr(tokenizer, "chat_template", None) != getattr(copy_tokenizer, "chat_template", None):
        problems.append("chat templates differ")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a .gguf path or package spec (anything from_pretrained takes)")
    parser.add_argument("out", type=Path, help="the directory to write (replaced if it exists)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    seconds = convert(args.source, args.out, getattr(torch, args.dtype))
    print(f"wrote {args.out}: " + ", ".join(f"{part} {value:.1f} s" for part, value in seconds.items())
          + "; weights, config and tokenizer equal to the source's")


if __name__ == "__main__":
    main()
