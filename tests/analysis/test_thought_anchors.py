"""``sparse_lens.analysis.thought_anchors`` is the entry point: it re-exports every public name of
the implementation modules under ``sparse_lens.analysis.anchors`` (tested in tests/analysis/anchors/)."""

import importlib

from sparse_lens import analysis

MODULES = ("sentences", "dense", "sparse", "salience", "agreement", "chain_of_thought")


def test_every_public_name_is_reexported():
    facade = importlib.import_module("sparse_lens.analysis.thought_anchors")
    for name in MODULES:
        module = importlib.import_module(f"sparse_lens.analysis.anchors.{name}")
        public = {key for key, value in vars(module).items()
                  if not key.startswith("_") and getattr(value, "__module__", None) == module.__name__}
        for key in public:
            assert getattr(facade, key) is getattr(module, key), key
        assert public <= set(facade.__all__), name
    for key in ("thought_anchors", "observe_thought_anchors", "compare_anchors", "split_sentences",
                "generate_chain_of_thought", "chain_of_thought_anchors", "tokenize_chain_of_thought", "ChainOfThought"):
        assert getattr(analysis, key) is getattr(facade, key)
