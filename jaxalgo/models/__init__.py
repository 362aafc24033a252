"""Models as chains of blocks (flax nnx), and their pure-function view.

Builders: :func:`mlp`, :func:`resnet`, :func:`vit`, :func:`cnn1d`, or :func:`build_model` by name (the catalogue
:data:`MODELS`, one options dataclass per model; ``module:function`` names a user's own factory).
Mixed precision: :func:`with_compute_dtype` makes a chain compute in bfloat16 with float32 parameters.
Every model is a :class:`Chain` whose blocks hold only ``nnx.Param`` s; weight matrices are 2-D ``kernel`` s
of ``nnx.Linear`` (``(in, out)``) or 4-D ``kernel`` s of ``nnx.Conv`` (``(kh, kw, in, out)``; :func:`cnn1d`'s
1-D convolutions are ``(k, 1, in, out)``).
"""

from jaxalgo.models._build import (
    MODELS,
    CNN1DOptions,
    ImportedModel,
    MLPOptions,
    ResNetOptions,
    ViTOptions,
    build_model,
    model_entry,
    model_options,
)
from jaxalgo.models._chain import BlockFns, Chain, ChainFn, ChainParams, chain_of, merge_chain, split_chain
from jaxalgo.models._cnn1d import Conv1DBlock, cnn1d
from jaxalgo.models._common import ACTIVATIONS
from jaxalgo.models._mlp import DenseBlock, mlp
from jaxalgo.models._precision import (
    FULL_PRECISION,
    MixedPrecisionChain,
    PrecisionPolicy,
    cast_floating,
    precision_policy,
    with_compute_dtype,
    with_precision_of,
)
from jaxalgo.models._resnet import ConvStem, PoolHead, ResidualBlock, resnet
from jaxalgo.models._vit import (
    PatchEmbedding,
    SelfAttention,
    TokenMeanHead,
    TransformerBlock,
    default_patch_size,
    vit,
)

__all__ = [
    "ACTIVATIONS",
    "FULL_PRECISION",
    "MODELS",
    "BlockFns",
    "CNN1DOptions",
    "Chain",
    "ChainFn",
    "ChainParams",
    "Conv1DBlock",
    "ConvStem",
    "DenseBlock",
    "ImportedModel",
    "MLPOptions",
    "MixedPrecisionChain",
    "PatchEmbedding",
    "PoolHead",
    "PrecisionPolicy",
    "ResNetOptions",
    "ResidualBlock",
    "SelfAttention",
    "TokenMeanHead",
    "TransformerBlock",
    "ViTOptions",
    "build_model",
    "cast_floating",
    "chain_of",
    "cnn1d",
    "default_patch_size",
    "merge_chain",
    "mlp",
    "model_entry",
    "model_options",
    "precision_policy",
    "resnet",
    "split_chain",
    "vit",
    "with_compute_dtype",
    "with_precision_of",
]
