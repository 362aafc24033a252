"""Low-rank training: factorised layers ``W = U S V^T``, OIALR, and the SVD helpers AB-training shares.

Public API:

- SVD helpers (:mod:`jaxalgo.lowrank._svd`): ``as_matrix``, ``factorize``, ``compose``, ``ab_factors``,
  ``cutoff_rank``, ``limited_rank``, ``rank_buckets``, ``bucket_size``, ``Factors``.
- Factorised layers: ``LowRankDense``, ``LowRankConv``, ``factorize_chain``, ``densify_chain``, ``find_layers``,
  ``LayerInfo``, ``factored_is_cheaper``, ``layer_params``, ``with_layer_params``.
- Optimizer plumbing: ``freeze_factors``, ``keep_count``, ``map_param_moments``, ``trainable_part``,
  ``with_frozen``; ``on_trainable_part`` for forward-gradient estimators.
- OIALR: ``OIALRConfig``, ``LowRankStatus``, ``convert``, ``stability_check``, ``check_window``,
  ``trainable_counts``, ``storage_sizes``; ``OIALRTrainer`` (OIALR between steps on any chain and loss),
  ``OIALRRunner`` (behind the runner protocol), ``OIALROptions`` and the catalogue ``LOWRANK``.
"""

from jaxalgo.lowrank._conv import LowRankConv
from jaxalgo.lowrank._hook import OIALRTrainer, estimator_for
from jaxalgo.lowrank._layers import (
    LayerInfo,
    LowRankDense,
    densify_chain,
    factored_is_cheaper,
    factorize_chain,
    find_layers,
    layer_params,
    with_layer_params,
)
from jaxalgo.lowrank._oialr import (
    LowRankStatus,
    OIALRConfig,
    check_window,
    convert,
    stability_check,
    storage_sizes,
    trainable_counts,
)
from jaxalgo.lowrank._optim import (
    freeze_factors,
    keep_count,
    map_param_moments,
    on_trainable_part,
    trainable_part,
    with_frozen,
)
from jaxalgo.lowrank._runner import LOWRANK, NoLowRank, OIALROptions, OIALRRunner
from jaxalgo.lowrank._svd import (
    Factors,
    ab_factors,
    as_matrix,
    bucket_size,
    compose,
    cutoff_rank,
    factorize,
    limited_rank,
    rank_buckets,
)

__all__ = [
    "LOWRANK",
    "Factors",
    "LayerInfo",
    "LowRankConv",
    "LowRankDense",
    "LowRankStatus",
    "NoLowRank",
    "OIALRConfig",
    "OIALROptions",
    "OIALRRunner",
    "OIALRTrainer",
    "ab_factors",
    "as_matrix",
    "bucket_size",
    "check_window",
    "compose",
    "convert",
    "cutoff_rank",
    "densify_chain",
    "estimator_for",
    "factored_is_cheaper",
    "factorize",
    "factorize_chain",
    "find_layers",
    "freeze_factors",
    "keep_count",
    "layer_params",
    "limited_rank",
    "map_param_moments",
    "on_trainable_part",
    "rank_buckets",
    "stability_check",
    "storage_sizes",
    "trainable_counts",
    "trainable_part",
    "with_frozen",
    "with_layer_params",
]
