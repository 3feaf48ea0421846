"""sparse_lens: attention-level interpretability on 100k-1M token contexts with Stream sparse tracing.

    import sparse_lens as sl
    model = sl.HookedSparseTransformer.from_pretrained(sl.DEFAULT_MODEL, stream=sl.TracingConfig(top_k=16))
    logits, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.3.attn.hook_pattern"]   # a BlockSparsePattern

Names that need TransformerLens (the model, fidelity) are imported on first use, so that
``import sparse_lens.kernels`` stays free of TransformerLens (kernel benchmarks on bare GPU images).
"""

from importlib import import_module

from sparse_lens.config import (
    ESTIMATORS,
    AdaptiveSettings,
    AntidiagonalSettings,
    EstimatorSettings,
    RescoredSettings,
    StreamConfig,
    StreamSettings,
    TracingConfig,
)
from sparse_lens.errors import (
    BlockSizeError,
    ContextTooLongError,
    DensePatternMethodError,
    DensePatternRequiredError,
    GradientModeError,
    IncompletePatternError,
    InvalidConfigError,
    InvalidPathError,
    InvalidPatternError,
    InvalidPositionsError,
    InvalidSpanError,
    LogitsNotKeptError,
    ModelSourceError,
    ObserveModeEditError,
    PaddingNotSupportedError,
    PatternGeometryError,
    SequenceParallelError,
    ShapeError,
    SparseLensError,
    TraceMismatchError,
    UnsupportedModelError,
)
from sparse_lens.kernels.blocks import BlockGeometry
from sparse_lens.pattern import BlockSparsePattern
from sparse_lens.pattern_stack import BlockSparsePatternStack

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_MODEL": "sparse_lens.tl.loading",
    "SUPPORTED_ARCHITECTURES": "sparse_lens.tl.loading",
    "HookedSparseTransformer": "sparse_lens.tl.model",
    "collect_dense": "sparse_lens.analysis.dense_trace",
    "fidelity": "sparse_lens.analysis.fidelity_metrics",
    "needle_fidelity": "sparse_lens.analysis.needle",
    "ruler_accuracy": "sparse_lens.analysis.task_accuracy",
}


# Sub-packages reachable as attributes without their own import (``sl.analysis``), imported on
# first use like the names above, so ``import sparse_lens`` stays light.
_SUBPACKAGES = ("analysis", "cli", "data", "kernels", "plots", "report", "tl")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return import_module(f"sparse_lens.{name}")  # the import binds it as an attribute too
    raise AttributeError(f"module 'sparse_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


__all__ = [
    "AdaptiveSettings",
    "AntidiagonalSettings",
    "BlockGeometry",
    "ESTIMATORS",
    "EstimatorSettings",
    "RescoredSettings",
    "StreamSettings",
    "TracingConfig",
    "BlockSizeError",
    "BlockSparsePattern",
    "BlockSparsePatternStack",
    "collect_dense",
    "ContextTooLongError",
    "DEFAULT_MODEL",
    "DensePatternMethodError",
    "DensePatternRequiredError",
    "fidelity",
    "GradientModeError",
    "HookedSparseTransformer",
    "IncompletePatternError",
    "InvalidConfigError",
    "InvalidPathError",
    "InvalidPatternError",
    "InvalidPositionsError",
    "InvalidSpanError",
    "LogitsNotKeptError",
    "ModelSourceError",
    "needle_fidelity",
    "ObserveModeEditError",
    "PaddingNotSupportedError",
    "PatternGeometryError",
    "ruler_accuracy",
    "SequenceParallelError",
    "ShapeError",
    "SparseLensError",
    "StreamConfig",
    "SUPPORTED_ARCHITECTURES",
    "TraceMismatchError",
    "UnsupportedModelError",
]
