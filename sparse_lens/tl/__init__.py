"""TransformerLens integration: the sparse attention bridge, the model class and model loading."""

from sparse_lens.tl.attention import SparseAttentionBridge
from sparse_lens.tl.loading import DEFAULT_MODEL, SUPPORTED_ARCHITECTURES
from sparse_lens.tl.model import HookedSparseTransformer

__all__ = ["DEFAULT_MODEL", "HookedSparseTransformer", "SUPPORTED_ARCHITECTURES", "SparseAttentionBridge"]
