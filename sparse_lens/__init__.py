"""sparse_lens: attention-level interpretability on 100k-1M token contexts with Stream sparse tracing.

    import sparse_lens as sl
    model = sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL, stream=sl.StreamConfig(top_k=16))
    logits, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.3.attn.hook_pattern"]   # a BlockSparsePattern
"""

from sparse_lens.analysis import collect_dense, fidelity
from sparse_lens.config import StreamConfig
from sparse_lens.errors import (
    BlockSizeError,
    ContextTooLongError,
    InvalidConfigError,
    ModelSourceError,
    PaddingNotSupportedError,
    ShapeError,
    SparseLensError,
    UnsupportedModelError,
)
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.tl import DEFAULT_MODEL, SUPPORTED_ARCHITECTURES, HookedSparseTransformer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "BlockSizeError",
    "BlockSparsePattern",
    "ContextTooLongError",
    "HookedSparseTransformer",
    "InvalidConfigError",
    "ModelSourceError",
    "PaddingNotSupportedError",
    "ShapeError",
    "SparseLensError",
    "StreamConfig",
    "UnsupportedModelError",
    "collect_dense",
    "fidelity",
]
