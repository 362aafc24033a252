"""The model catalogue: one options dataclass per model, and a user's own model factory by ``module:function``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
from flax import nnx

from jaxalgo.models._chain import Chain
from jaxalgo.models._cnn1d import cnn1d
from jaxalgo.models._mlp import mlp
from jaxalgo.models._resnet import resnet
from jaxalgo.models._vit import vit
from jaxalgo.options import Catalogue, Entry, check_fields, import_object, option, pick


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MLPOptions:
    """A multi-layer perceptron (:func:`jaxalgo.models.mlp`).

    Attributes:
      hidden: hidden widths, comma-separated on the command line (e.g. 256,256).
      activation: hidden activation.
    """

    hidden: tuple[int, ...] = (256, 256)
    activation: Literal["relu", "tanh", "gelu", "sigmoid", "silu"] = "relu"

    def __post_init__(self):
        check_fields(self)
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"hidden: widths must be integers >= 1, got {self.hidden!r}")

    def build(self, input_shape: tuple[int, ...], num_outputs: int, *, key: jax.Array) -> Chain:
        return mlp(input_shape, num_outputs, hidden=self.hidden, activation=self.activation, key=key)


@dataclasses.dataclass(frozen=True)
class ResNetOptions:
    """A small ResNet for images (:func:`jaxalgo.models.resnet`).

    Attributes:
      channels: channels of each stage, comma-separated (e.g. 16,32,64).
      blocks_per_stage: residual blocks per stage.
    """

    channels: tuple[int, ...] = option((16, 32, 64), flag="resnet_channels")
    blocks_per_stage: int = option(1, flag="resnet_blocks")

    def __post_init__(self):
        check_fields(self)
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels: must be one or more integers >= 1, got {self.channels!r}")
        _check_positive(self, "blocks_per_stage")

    def build(self, input_shape: tuple[int, ...], num_outputs: int, *, key: jax.Array) -> Chain:
        return resnet(input_shape, num_outputs, channels=self.channels, blocks_per_stage=self.blocks_per_stage, key=key)


@dataclasses.dataclass(frozen=True)
class ViTOptions:
    """A Vision Transformer (:func:`jaxalgo.models.vit`).

    Attributes:
      dim: token width, a multiple of heads.
      depth: Transformer blocks.
      heads: attention heads.
      mlp_dim: hidden width of each block's MLP (None: twice the token width).
      patch_size: patch side, dividing the image's height and width (None: 2 for 8x8 images, 4 for 28x28 and 32x32).
    """

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int | None = None
    patch_size: int | None = None

    def __post_init__(self):
        check_fields(self)
        _check_positive(self, "dim", "depth", "heads", "mlp_dim", "patch_size")
        if self.dim % self.heads:
            raise ValueError(f"dim: got {self.dim}, which is not a multiple of heads={self.heads}")

    def build(self, input_shape: tuple[int, ...], num_outputs: int, *, key: jax.Array) -> Chain:
        mlp_dim = 2 * self.dim if self.mlp_dim is None else self.mlp_dim
        return vit(
            input_shape,
            num_outputs,
            patch_size=self.patch_size,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            mlp_dim=mlp_dim,
            key=key,
        )


@dataclasses.dataclass(frozen=True)
class CNN1DOptions:
    """A 1-D convolutional network for signals such as mnist1d (:func:`jaxalgo.models.cnn1d`; the defaults are
    the MNIST-1D paper's ConvNet).

    Attributes:
      channels: output channels of each convolution, comma-separated (e.g. 25,25,25).
      kernel_sizes: kernel width of each convolution, one per channel entry (e.g. 5,3,3).
      stride: stride of every convolution.
      padding: zeros at each end of every convolution's input.
    """

    channels: tuple[int, ...] = (25, 25, 25)
    kernel_sizes: tuple[int, ...] = (5, 3, 3)
    stride: int = 2
    padding: int = 1

    def __post_init__(self):
        check_fields(self)
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels: must be one or more integers >= 1, got {self.channels!r}")
        if len(self.kernel_sizes) != len(self.channels) or any(k < 1 for k in self.kernel_sizes):
            raise ValueError(
                f"kernel_sizes: must be {len(self.channels)} integers >= 1 (one per channel entry), "
                f"got {self.kernel_sizes!r}"
            )
        _check_positive(self, "stride")
        if self.padding < 0:
            raise ValueError(f"padding: must be an integer >= 0, got {self.padding!r}")

    def build(self, input_shape: tuple[int, ...], num_outputs: int, *, key: jax.Array) -> Chain:
        return cnn1d(
            input_shape,
            num_outputs,
            channels=self.channels,
            kernel_sizes=self.kernel_sizes,
            stride=self.stride,
            padding=self.padding,
            key=key,
        )


@dataclasses.dataclass(frozen=True)
class ImportedModel:
    """A user's own model factory, ``module:function``: ``function(input_shape, num_outputs, *, key)`` returning a
    :class:`jaxalgo.models.Chain` (block-wise estimators see its blocks) or any other ``nnx.Module`` mapping a batch
    of inputs to outputs (wrapped as a chain of one block).

    Attributes:
      target: the factory, as ``package.module:function`` (importable from the working directory).
    """

    target: str = ""
    imported: ClassVar[bool] = True

    def __post_init__(self):
        check_fields(self)

    def build(self, input_shape: tuple[int, ...], num_outputs: int, *, key: jax.Array) -> Chain:
        factory = import_object(self.target, argument="model")
        model = factory(tuple(input_shape), num_outputs, key=key)
        if isinstance(model, Chain):
            return model
        if isinstance(model, nnx.Module):
            return Chain([model])
        raise ValueError(
            f"model: {self.target!r} returned a {type(model).__name__}; "
            "expected a jaxalgo.models.Chain or an nnx.Module"
        )


MODELS: Catalogue = {
    "mlp": Entry(MLPOptions, help="multi-layer perceptron"),
    "resnet": Entry(ResNetOptions, help="small ResNet (images)"),
    "vit": Entry(ViTOptions, prefix="vit_", help="Vision Transformer (images)"),
    "cnn1d": Entry(CNN1DOptions, prefix="cnn1d_", help="1-D ConvNet (signals, e.g. mnist1d)"),
}
"""The model catalogue: name -> :class:`jaxalgo.options.Entry`; ``module:function`` names a user's own factory."""


def model_entry(name: str) -> Entry:
    """The catalogue entry of ``name``, or of a user's factory when ``name`` is ``module:function``."""
    if isinstance(name, str) and ":" in name:
        return Entry(ImportedModel, fixed={"target": name})
    return pick(MODELS, name, family="model")


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options that model ``name`` accepts in :func:`build_model`."""
    return tuple(f.name for f in dataclasses.fields(model_entry(name).options))


def build_model(name: str, *, input_shape: tuple[int, ...], num_outputs: int, key: jax.Array, **options) -> Chain:
    """Builds the model called ``name`` with its options (see :data:`MODELS` and :func:`model_options`).

    Raises:
      ValueError: ``name`` is not in :data:`MODELS`, or an option is out of range.
      TypeError: an option is not one the model takes.
    """
    entry = model_entry(name)
    allowed = model_options(name)
    for option_name in options:
        if option_name not in allowed:
            raise TypeError(
                f"{option_name}: got unknown option {option_name!r} for model {name!r}; "
                f"allowed options: {', '.join(allowed)}"
            )
    return entry.make(**options).build(input_shape, num_outputs, key=key)
