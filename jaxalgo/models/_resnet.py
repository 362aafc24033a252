"""Small residual networks (He et al. 2016) with GroupNorm, as chains of blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalgo.models._chain import Chain
from jaxalgo.models._common import (
    check_input_shape,
    check_int_sequence,
    check_key,
    check_positive_int,
    group_count,
)

# A stage downsamples (stride 2) only while the feature map is at least this large, so a 3x3 conv after the
# last downsampling still sees a map of at least 2x2 (8x8 digits: 8 -> 4 -> 2 and then no more).
_MIN_SIZE_TO_DOWNSAMPLE = 4


_lecun_normal = jax.nn.initializers.lecun_normal()


def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """LeCun-normal conv kernel (flax's default), drawn as its ``(kh * kw * in, out)`` matrix and reshaped.

    The distribution is the default one (truncated normal, variance ``1 / fan_in`` with
    ``fan_in = kh * kw * in``); drawing the 2-D matrix compiles several times faster on CPU than drawing the
    4-D array directly, which matters because every new kernel shape compiles its own initialiser.
    """
    return _lecun_normal(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def _conv(in_features: int, out_features: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # No bias: every conv is followed by a normalisation with its own shift.
    return nnx.Conv(
        in_features,
        out_features,
        (size, size),
        strides=stride,
        padding="SAME",
        use_bias=False,
        kernel_init=conv_kernel_init,
        rngs=rngs,
    )


def _norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=group_count(channels), rngs=rngs)


class ConvStem(nnx.Module):
    r"""The stem: :math:`h = \mathrm{relu}(\mathrm{GN}(\mathrm{conv}_{3\times3}(x)))`, stride 1.

    Args:
      in_channels: input channels ``C``.
      out_channels: output channels.
      rngs: the random streams for the initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv(in_channels, out_channels, 3, 1, rngs)
        self.norm = _norm(out_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


class ResidualBlock(nnx.Module):
    r"""A basic residual block (He et al. 2016) with GroupNorm in place of BatchNorm.

    .. math::
      h = \mathrm{relu}\big(\mathrm{GN}(\mathrm{conv}(\mathrm{relu}(\mathrm{GN}(\mathrm{conv}_s(x)))))
          + P(x)\big)

    where :math:`P` is the identity, or a strided 1x1 conv and GroupNorm when the shape changes.

    Args:
      in_channels: input channels.
      out_channels: output channels.
      stride: stride of the first conv and the projection (1 or 2).
      rngs: the random streams for the initialisation.

    References:
      He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016 (arXiv 1512.03385).
      Wu, He, *Group Normalization*, ECCV 2018 (arXiv 1803.08494).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, rngs: nnx.Rngs):
        self.conv1 = _conv(in_channels, out_channels, 3, stride, rngs)
        self.norm1 = _norm(out_channels, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, rngs)
        self.norm2 = _norm(out_channels, rngs)
        if stride != 1 or in_channels != out_channels:
            self.proj_conv: nnx.Conv | None = _conv(in_channels, out_channels, 1, stride, rngs)
            self.proj_norm: nnx.GroupNorm | None = _norm(out_channels, rngs)
        else:
            self.proj_conv = None
            self.proj_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        skip = x if self.proj_conv is None or self.proj_norm is None else self.proj_norm(self.proj_conv(x))
        return jax.nn.relu(h + skip)


class PoolHead(nnx.Module):
    r"""The head: global average pooling over height and width, then a dense layer (logits, no activation).

    Args:
      in_channels: input channels.
      num_outputs: output width.
      rngs: the random streams for the initialisation.
    """

    def __init__(self, in_channels: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_channels, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(jnp.mean(x, axis=(1, 2)))


def resnet(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    channels: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    key: jax.Array,
) -> Chain:
    """A small ResNet for NHWC images as a :class:`Chain`.

    Blocks: a stem (3x3 conv, GroupNorm, relu) to ``channels[0]``; then for each stage ``s``,
    ``blocks_per_stage`` :class:`ResidualBlock` s with ``channels[s]`` outputs, the first of a stage ``s > 0``
    with stride 2 while the feature map is at least 4x4 (so 8x8 digits go 8 -> 4 -> 2, 28x28 go 28 -> 14 -> 7,
    32x32 go 32 -> 16 -> 8); then a head (global average pool, dense). ``1 + len(channels) *
    blocks_per_stage + 1`` blocks in all; the last outputs logits. Stateless: GroupNorm, no BatchNorm.

    Args:
      input_shape: the image shape ``(H, W, C)``, without the batch axis.
      num_outputs: the output width, ``>= 1``.
      channels: the channels of each stage, a non-empty sequence of positive integers.
      blocks_per_stage: residual blocks per stage, ``>= 1``.
      key: the PRNG key of the initialisation.

    Returns:
      The model, a :class:`Chain`.

    References:
      He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016 (arXiv 1512.03385).
    """
    height, width, in_channels = check_input_shape(input_shape, image=True)
    num_outputs = check_positive_int(num_outputs, "num_outputs")
    stage_channels = check_int_sequence(channels, "channels")
    blocks_per_stage = check_positive_int(blocks_per_stage, "blocks_per_stage")
    rngs = nnx.Rngs(check_key(key))

    blocks: list[nnx.Module] = [ConvStem(in_channels, stage_channels[0], rngs=rngs)]
    current = stage_channels[0]
    for stage, out_channels in enumerate(stage_channels):
        for index in range(blocks_per_stage):
            stride = 1
            if stage > 0 and index == 0 and min(height, width) >= _MIN_SIZE_TO_DOWNSAMPLE:
                stride = 2
                height, width = -(-height // 2), -(-width // 2)  # SAME padding: ceil(size / 2)
            blocks.append(ResidualBlock(current, out_channels, stride=stride, rngs=rngs))
            current = out_channels
    blocks.append(PoolHead(current, num_outputs, rngs=rngs))
    return Chain(blocks)
