"""A small 1-D convolutional network for signals (the MNIST-1D paper's ConvNet), as a chain of blocks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxalgo.models._chain import Chain
from jaxalgo.models._common import check_input_shape, check_int_sequence, check_key, check_positive_int
from jaxalgo.models._mlp import DenseBlock
from jaxalgo.models._resnet import conv_kernel_init


def conv1d_output_length(length: int, kernel_size: int, stride: int, padding: int) -> int:
    r"""The output length of a 1-D convolution: :math:`\lfloor (L + 2p - k) / s \rfloor + 1`."""
    return (length + 2 * padding - kernel_size) // stride + 1


class Conv1DBlock(nnx.Module):
    r"""One 1-D convolution and a relu: :math:`h_{t,o} = \mathrm{relu}(b_o + \sum_{j,c} x_{st + j - p,\,c}\,
    K_{j,c,o})`, with zero padding ``p`` on both ends.

    Inputs are ``(N, L, C)`` (length, channels); ``(N, L)`` is read as one channel. Outputs are
    ``(N, L', out_channels)`` with ``L' = floor((L + 2p - k) / s) + 1``. The convolution is held as a 2-D
    ``nnx.Conv`` of a ``k x 1`` window over ``(N, L, 1, C)``, so its kernel is 4-D ``(k, 1, C, out_channels)`` like
    every conv kernel in jaxalgo (the low-rank methods and rank-1 tangents treat it like any other conv).

    Args:
      in_channels: input channels ``C``.
      out_channels: output channels.
      kernel_size: kernel width ``k``.
      stride: stride ``s``.
      padding: zeros added at each end, ``p``.
      rngs: the random streams for the initialisation (LeCun-normal kernel, zero bias).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int, padding: int, rngs: nnx.Rngs
    ):
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, 1),
            strides=(stride, 1),
            padding=((padding, padding), (0, 0)),
            kernel_init=conv_kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        h = self.conv(x[:, :, None, :])  # (N, L, 1, C) -> (N, L', 1, out)
        return jax.nn.relu(h[:, :, 0, :])


def cnn1d(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    channels: Sequence[int] = (25, 25, 25),
    kernel_sizes: Sequence[int] = (5, 3, 3),
    stride: int = 2,
    padding: int = 1,
    key: jax.Array,
) -> Chain:
    r"""A 1-D convolutional network as a :class:`Chain`: conv blocks with relu, then a linear readout.

    .. math::
      h_0 = x, \quad h_l = \mathrm{relu}(\mathrm{conv}_{k_l, s, p}(h_{l-1})) \ (l \le L), \quad
      y = \mathrm{flatten}(h_L) W + b

    The defaults are the MNIST-1D paper's ConvNet: three convolutions of 25 channels, kernels 5, 3, 3, stride
    2, padding 1, so a 40-point signal goes 40 -> 19 -> 10 -> 5 and the readout maps 5 x 25 = 125 features to
    the outputs (5,210 parameters for 10 classes). ``len(channels) + 1`` blocks: :class:`Conv1DBlock` s and a
    :class:`DenseBlock` readout (logits, no activation).

    Args:
      input_shape: the signal's shape ``(L,)`` or ``(L, C)``, without the batch axis.
      num_outputs: the output width, ``>= 1``.
      channels: output channels of each convolution, a non-empty sequence of positive integers.
      kernel_sizes: kernel width of each convolution, as many as ``channels``.
      stride: stride of every convolution, ``>= 1``.
      padding: zeros at each end of every convolution's input, ``>= 0``.
      key: the PRNG key of the initialisation.

    Returns:
      The model, a :class:`Chain`.

    Raises:
      ValueError: a bad argument, or a signal too short for the convolutions (an output length below 1).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = cnn1d((40, 1), 10, key=jax.random.key(0))
      >>> model(jnp.zeros((3, 40, 1))).shape
      (3, 10)

    References:
      Greydanus, *Scaling down Deep Learning with MNIST-1D*, ICML 2024 (arXiv 2011.14439).
    """
    shape = check_input_shape(input_shape, image=False)
    if len(shape) not in (1, 2):
        raise ValueError(f"input_shape: got {shape!r}; expected a signal (length,) or (length, channels)")
    length, in_channels = shape[0], shape[1] if len(shape) == 2 else 1
    num_outputs = check_positive_int(num_outputs, "num_outputs")
    widths = check_int_sequence(channels, "channels")
    kernels = check_int_sequence(kernel_sizes, "kernel_sizes")
    if len(kernels) != len(widths):
        raise ValueError(
            f"kernel_sizes: got {len(kernels)} sizes {kernels!r} for {len(widths)} convolutions; give one per channel"
        )
    stride = check_positive_int(stride, "stride")
    padding = check_positive_int(padding, "padding", minimum=0)
    key = check_key(key)
    lengths = _lengths(length, kernels, stride, padding)

    rngs = nnx.Rngs(key)
    blocks: list[nnx.Module] = []
    for width, kernel in zip(widths, kernels, strict=True):
        blocks.append(Conv1DBlock(in_channels, width, kernel_size=kernel, stride=stride, padding=padding, rngs=rngs))
        in_channels = width
    blocks.append(DenseBlock(lengths[-1] * in_channels, num_outputs, activation="identity", flatten=True, rngs=rngs))
    return Chain(blocks)


def _lengths(length: int, kernels: Sequence[int], stride: int, padding: int) -> list[int]:
    """The signal's length after each convolution; raises if one falls below 1."""
    lengths = []
    for kernel in kernels:
        out_length = conv1d_output_length(length, kernel, stride, padding)
        if out_length < 1:
            raise ValueError(
                f"input_shape: a signal of length {length} is too short for a kernel of {kernel} with padding "
                f"{padding}; use a smaller kernel, more padding or a longer signal"
            )
        lengths.append(out_length)
        length = out_length
    return lengths
