"""Natural prose for fidelity runs and essay haystacks, shipped with the package.

``texts/essays.txt`` holds nine original essays (about 8,400 words, ~10k tokens) written for
sparse_lens and dedicated to the public domain (CC0 1.0); no third-party text. Longer inputs
cycle through the essays in a seeded order.
"""

from __future__ import annotations

import random
from importlib.resources import files
from typing import Any


def essays() -> list[str]:
    """The shipped essays, each with its ``# Title`` line."""
    text = files("sparse_lens.data").joinpath("texts/essays.txt").read_text(encoding="utf-8")
    parts = text.split("\n# ")[1:]  # the first part is the licence line
    return ["# " + part.strip() + "\n" for part in parts]


def prose_tokens(tokenizer: Any, length: int, *, seed: int = 0) -> list[int]:
    """Exactly ``length`` token ids of essay prose (essays in a seeded order, cycled as needed)."""
    order = essays()
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    while len(ids) < length:
        for essay in order:
            ids += tokenizer(essay + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                break
    return ids[:length]
