"""Progressive Length Prediction: entropy-guided features, the length head, and its online trainer."""

from .features import POOLING_METHODS, StreamingPool, feature_size, plp_features, pool_tokens, token_entropy
from .head import HeadConfig, PLPHead, bin_centers, bin_edges, bin_index, read_head_config, soft_labels
from .online import NaiveLengthBaseline, OnlineTrainer, ReplayBuffer

__all__ = [
    "POOLING_METHODS",
    "HeadConfig",
    "NaiveLengthBaseline",
    "OnlineTrainer",
    "PLPHead",
    "ReplayBuffer",
    "StreamingPool",
    "bin_centers",
    "bin_edges",
    "bin_index",
    "feature_size",
    "plp_features",
    "pool_tokens",
    "read_head_config",
    "soft_labels",
    "token_entropy",
]
