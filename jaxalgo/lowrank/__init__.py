"""Low-rank training: factorised layers ``W = U S V^T``, OIALR, and the SVD helpers AB-training shares.

Public API:

- SVD helpers (:mod:`jaxalgo.lowrank._svd`): ``as_matrix``, ``factorize``, ``compose``, ``ab_factors``,
  ``cutoff_rank``, ``limited_rank``, ``rank_buckets``, ``bucket_size``, ``Factors``.
- Factorised layers: ``LowRankDense``, ``LowRankConv``, ``factorize_chain``, ``densify_chain``, ``find_layers``,
  ``LayerInfo``, ``factored_is_cheaper``, ``layer_params``, ``with_layer_params``.
- Optimizer plumbing (any pytree: plain or linen-style dicts, ``nnx.State`` via the :class:`FrozenFactor` type,
  equinox partitions via an explicit ``mask``): ``freeze_factors``, ``trainable_mask``, ``trainable_part``,
  ``fill_frozen``, ``with_frozen``, ``keep_count``, ``map_param_moments``;
  ``on_trainable_part`` for forward-gradient estimators.
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
    fill_frozen,
    freeze_factors,
    keep_count,
    map_param_moments,
    on_trainable_part,
    trainable_mask,
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
from jaxalgo.lowrank._variables import FrozenFactor

__all__ = [
    "LOWRANK",
    "Factors",
    "FrozenFactor",
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
    "fill_frozen",
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
    "trainable_mask",
    "trainable_part",
    "with_frozen",
    "with_layer_params",
]
