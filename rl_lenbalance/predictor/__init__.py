"""Progressive Length Prediction: entropy-guided features, the length head, and its online trainer."""

from .context import CONTEXT_SIZE, LengthHistory, context_vector, kendall_tau
from .features import POOLING_METHODS, StreamingPool, feature_size, plp_features, pool_tokens, token_entropy
from .head import HeadConfig, PLPHead, bin_centers, bin_edges, bin_index, read_head_config, soft_labels
from .online import NaiveLengthBaseline, OnlineTrainer, ReplayBuffer

__all__ = [
    "CONTEXT_SIZE",
    "POOLING_METHODS",
    "HeadConfig",
    "LengthHistory",
    "NaiveLengthBaseline",
    "OnlineTrainer",
    "PLPHead",
    "ReplayBuffer",
    "StreamingPool",
    "bin_centers",
    "bin_edges",
    "bin_index",
    "context_vector",
    "feature_size",
    "kendall_tau",
    "plp_features",
    "pool_tokens",
    "read_head_config",
    "soft_labels",
    "token_entropy",
]
