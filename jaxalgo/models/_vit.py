"""Vision Transformers (Dosovitskiy et al. 2021) as chains of blocks, with attention written out by hand.

Attention uses four ``nnx.Linear`` projections (query, key, value, output), so every weight matrix is a 2-D
``(in, out)`` kernel that low-rank and rank-1 code can treat like any dense layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalgo.models._chain import Chain
from jaxalgo.models._common import ACTIVATIONS, check_input_shape, check_key, check_positive_int

_MAX_DEFAULT_TOKENS = 64


class PatchEmbedding(nnx.Module):
    r"""Cuts NHWC images into ``p x p`` patches, embeds each linearly and adds a learned position embedding.

    .. math:: z_t = \mathrm{vec}(x_{\text{patch } t}) E + b + P_t, \quad t = 1..T, \ T = HW / p^2

    Patches are taken in row-major order; ``vec`` flattens a patch as ``(row, column, channel)``.

    Args:
      image_shape: ``(H, W, C)``; ``p`` divides ``H`` and ``W``.
      patch_size: ``p``.
      dim: the embedding width.
      rngs: the random streams for the initialisation.
    """

    def __init__(self, image_shape: tuple[int, int, int], patch_size: int, dim: int, *, rngs: nnx.Rngs):
        height, width, channels = image_shape
        self.patch_size = patch_size
        self.num_tokens = (height // patch_size) * (width // patch_size)
        self.linear = nnx.Linear(patch_size * patch_size * channels, dim, rngs=rngs)
        self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (self.num_tokens, dim)))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, height, width, channels = x.shape
        p = self.patch_size
        patches = x.reshape(n, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, (height // p) * (width // p), p * p * channels)
        return self.linear(patches) + self.position[...]


class SelfAttention(nnx.Module):
    r"""Multi-head scaled dot-product self-attention (Vaswani et al. 2017) on ``(N, T, D)`` tokens.

    .. math::
      Q = XW_q + b_q,\ K = XW_k + b_k,\ V = XW_v + b_v
      \ \text{(split into } h \text{ heads of width } d = D/h),
      \quad O_i = \mathrm{softmax}\!\left(Q_i K_i^\top / \sqrt{d}\right) V_i,
      \quad Y = [O_1, \dots, O_h] W_o + b_o

    Args:
      dim: the token width ``D``, divisible by ``heads``.
      heads: the number of heads ``h``.
      rngs: the random streams for the initialisation.

    References:
      Vaswani et al., *Attention Is All You Need*, NeurIPS 2017 (arXiv 1706.03762).
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads != 0:
            raise ValueError(f"dim: got {dim}, not divisible by heads={heads}; allowed: a multiple of heads")
        self.heads = heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, tokens, dim = x.shape
        head_dim = dim // self.heads

        def split(h: jax.Array) -> jax.Array:
            return h.reshape(n, tokens, self.heads, head_dim)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("nthd,nshd->nhts", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1)
        mixed = jnp.einsum("nhts,nshd->nthd", weights, v).reshape(n, tokens, dim)
        return self.out(mixed)


class TransformerBlock(nnx.Module):
    r"""A pre-LayerNorm Transformer encoder block.

    .. math::
      u = z + \mathrm{MSA}(\mathrm{LN}_1(z)), \quad
      z' = u + W_2\,\mathrm{gelu}(W_1\,\mathrm{LN}_2(u) + b_1) + b_2

    It acts on each token alike apart from attention, so it is equivariant to permutations of the tokens.

    Args:
      dim: the token width.
      heads: attention heads (divide ``dim``).
      mlp_dim: the hidden width of the MLP.
      rngs: the random streams for the initialisation.

    References:
      Dosovitskiy et al., *An Image is Worth 16x16 Words*, ICLR 2021 (arXiv 2010.11929).
      Xiong et al., *On Layer Normalization in the Transformer Architecture*, ICML 2020 (arXiv 2002.04745).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = SelfAttention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        z = z + self.attention(self.norm1(z))
        return z + self.mlp_out(ACTIVATIONS["gelu"](self.mlp_in(self.norm2(z))))


class TokenMeanHead(nnx.Module):
    r"""The head: :math:`y = \mathrm{mean}_t\,\mathrm{LN}(z)_t\, W + b` (logits, no activation).

    Args:
      dim: the token width.
      num_outputs: output width.
      rngs: the random streams for the initialisation.
    """

    def __init__(self, dim: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.linear = nnx.Linear(dim, num_outputs, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.linear(jnp.mean(self.norm(z), axis=1))


def default_patch_size(height: int, width: int) -> int:
    """The default patch size for an image of ``height x width``.

    The smallest common divisor ``p >= 2`` of ``height`` and ``width`` that gives at most 64 tokens
    (8x8 -> 2, 28x28 -> 4, 32x32 -> 4); failing that, the largest common divisor.
    """
    common = [p for p in range(1, math.gcd(height, width) + 1) if height % p == 0 and width % p == 0]
    for p in common:
        if p >= 2 and (height // p) * (width // p) <= _MAX_DEFAULT_TOKENS:
            return p
    return common[-1]


def vit(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
    key: jax.Array,
) -> Chain:
    """A Vision Transformer for NHWC images as a :class:`Chain` of ``depth + 2`` blocks.

    Blocks: :class:`PatchEmbedding` (patches, linear embedding, learned position embedding), ``depth``
    pre-LayerNorm :class:`TransformerBlock` s (multi-head self-attention and a gelu MLP, both residual), and
    :class:`TokenMeanHead` (LayerNorm, mean over tokens, dense; no class token). The last block outputs
    logits.

    Args:
      input_shape: the image shape ``(H, W, C)``, without the batch axis.
      num_outputs: the output width, ``>= 1``.
      patch_size: the patch side ``p``, dividing ``H`` and ``W``; ``None`` picks
        :func:`default_patch_size` (2 for 8x8, 4 for 28x28 and 32x32).
      dim: the token width, divisible by ``heads``.
      depth: the number of Transformer blocks, ``>= 1``.
      heads: attention heads, ``>= 1``.
      mlp_dim: the hidden width of each block's MLP.
      key: the PRNG key of the initialisation.

    Returns:
      The model, a :class:`Chain`.

    References:
      Dosovitskiy et al., *An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale*,
      ICLR 2021 (arXiv 2010.11929).
    """
    height, width, channels = check_input_shape(input_shape, image=True)
    num_outputs = check_positive_int(num_outputs, "num_outputs")
    if patch_size is None:
        patch_size = default_patch_size(height, width)
    patch_size = check_positive_int(patch_size, "patch_size")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"patch_size: got {patch_size}, which does not divide the image size {height}x{width}; "
            f"allowed: a common divisor of height and width, e.g. {default_patch_size(height, width)}"
        )
    dim = check_positive_int(dim, "dim")
    depth = check_positive_int(depth, "depth")
    heads = check_positive_int(heads, "heads")
    mlp_dim = check_positive_int(mlp_dim, "mlp_dim")
    if dim % heads:
        raise ValueError(
            f"dim: got {dim}, which is not divisible by heads={heads}; allowed: a multiple of heads (e.g. {heads * 16})"
        )
    rngs = nnx.Rngs(check_key(key))

    blocks: list[nnx.Module] = [PatchEmbedding((height, width, channels), patch_size, dim, rngs=rngs)]
    blocks += [TransformerBlock(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)]
    blocks.append(TokenMeanHead(dim, num_outputs, rngs=rngs))
    return Chain(blocks)
