"""The 1-D ConvNet (``cnn1d``): shapes, the paper's figures, an independent forward pass, exact backprop, training."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalgo import data, grads, losses, models
from jaxalgo.config import RunConfig
from jaxalgo.train import train_and_evaluate


def tiny_signals(*, seed, test_fraction, data_dir):
    """A tiny MNIST-1D slice (100 generated examples: 80 train, 20 test), a user loader for the runs below."""
    x_train, y_train, x_test, y_test = data.mnist1d_arrays(num_samples=100)
    mean, std = x_train.mean(), x_train.std()
    return data.Dataset(
        name="tiny_mnist1d",
        task="classification",
        x_train=((x_train - mean) / std)[..., None].astype(np.float32),
        y_train=y_train,
        x_test=((x_test - mean) / std)[..., None].astype(np.float32),
        y_test=y_test,
        num_outputs=10,
    )


def reference_forward(params, x, *, stride=2, padding=1):
    """The ConvNet written out independently: explicit zero padding and windows, ``einsum`` over them."""
    h = x
    for block in params[:-1]:
        kernel, bias = block["conv"]["kernel"][:, 0], block["conv"]["bias"]  # (k, 1, in, out) -> (k, in, out)
        size = kernel.shape[0]
        padded = jnp.pad(h, ((0, 0), (padding, padding), (0, 0)))
        out_length = (padded.shape[1] - size) // stride + 1
        windows = jnp.stack([padded[:, t * stride : t * stride + size, :] for t in range(out_length)], axis=1)
        h = jax.nn.relu(jnp.einsum("ntjc,jco->nto", windows, kernel) + bias)
    head = params[-1]["linear"]
    return h.reshape(h.shape[0], -1) @ head["kernel"] + head["bias"]


def _shapes(builder, *args, **kwargs):
    """The chain's pure view and abstract parameters: shapes only, nothing drawn or compiled."""
    return models.split_chain(nnx.eval_shape(lambda: builder(*args, **kwargs)))


def test_paper_figures_and_output_shape():
    fn, params = _shapes(models.cnn1d, (40, 1), 10, key=jax.random.key(0))
    assert fn.num_blocks == 4
    # the paper's ConvNet: 5,210 parameters; lengths 40 -> 19 -> 10 -> 5, readout 125 -> 10
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 5210
    # every conv kernel in jaxalgo is 4-D (k, 1, in, out here), every dense kernel 2-D
    assert [block["conv"]["kernel"].shape for block in params[:-1]] == [(5, 1, 1, 25), (3, 1, 25, 25), (3, 1, 25, 25)]
    assert params[-1]["linear"]["kernel"].shape == (125, 10)
    outputs = jax.eval_shape(fn.block_outputs, params, jax.ShapeDtypeStruct((3, 40, 1), jnp.float32))
    assert [o.shape for o in outputs] == [(3, 19, 25), (3, 10, 25), (3, 5, 25), (3, 10)]
    fn, params = _shapes(models.cnn1d, (40,), 10, key=jax.random.key(0))  # one channel, without its axis
    assert jax.eval_shape(fn.apply, params, jax.ShapeDtypeStruct((2, 40), jnp.float32)).shape == (2, 10)
    fn, params = _shapes(
        models.build_model,
        "cnn1d",
        input_shape=(40, 1),
        num_outputs=3,
        key=jax.random.key(0),
        channels=(4, 6),
        kernel_sizes=(3, 3),
    )
    assert jax.eval_shape(fn.apply, params, jax.ShapeDtypeStruct((2, 40, 1), jnp.float32)).shape == (2, 3)
    assert "cnn1d" in models.MODELS and models.MODELS["cnn1d"].options is models.CNN1DOptions


def test_forward_matches_an_independent_implementation():
    model = models.cnn1d((40, 1), 10, key=jax.random.key(1))
    fn, params = models.split_chain(model)
    x = jax.random.normal(jax.random.key(2), (4, 40, 1))
    got, want = jax.jit(lambda p, x: (fn.apply(p, x), reference_forward(p, x)))(params, x)  # one compilation
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_backprop_estimator_is_exact_against_jax_grad_of_the_reference():
    model = models.cnn1d((40, 1), 10, key=jax.random.key(3))
    fn, params = models.split_chain(model)
    ce = losses.get_loss("cross_entropy")
    batch = {"x": jax.random.normal(jax.random.key(4), (8, 40, 1)), "y": jnp.arange(8) % 10}
    estimator = grads.backprop(lambda p, b: ce(fn.apply(p, b["x"]), b["y"]))
    reference = jax.value_and_grad(lambda p: ce(reference_forward(p, batch["x"]), batch["y"]))

    @jax.jit  # both in one compilation
    def both(params, state):
        return estimator.value_and_grad(params, state, batch, key=jax.random.key(5)), reference(params)

    (loss, grad, _), (want_loss, want_grad) = both(params, estimator.init(params))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_sizes": (5, 3)}, "kernel_sizes: got 2 sizes"),
        ({"input_shape": (2, 1)}, "input_shape: a signal of length 2 is too short"),
        ({"input_shape": (8, 8, 1)}, "input_shape: got (8, 8, 1); expected a signal"),
        ({"stride": 0}, "stride: got 0"),
        ({"padding": -1}, "padding: got -1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    arguments = {"input_shape": (40, 1), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        models.cnn1d(arguments.pop("input_shape"), 10, key=jax.random.key(0), **arguments)
    with pytest.raises(ValueError, match="kernel_sizes: must be 3 integers"):
        RunConfig.from_flags(model="cnn1d", cnn1d_kernel_sizes=(5, 3))


@pytest.mark.parametrize("estimator", ["backprop", "f3", "frog"])
def test_trains_through_jaxalgo_train(tmp_path, estimator):
    flags = {"tangents": 4} if estimator == "frog" else {}
    config = RunConfig.from_flags(
        dataset="tests.test_cnn1d:tiny_signals",
        model="cnn1d",
        cnn1d_channels=(8, 8),
        cnn1d_kernel_sizes=(5, 3),
        estimator=estimator,
        epochs=4,
        batch_size=16,
        quiet=True,
        **flags,
    )
    final = train_and_evaluate(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert final["steps"] == 4 * (80 // 16)
    assert np.isfinite(final["test_loss"]) and 0.0 <= final["test_accuracy"] <= 1.0
    train_losses = [line["train_loss"] for line in lines if "train_loss" in line]
    assert len(train_losses) == 4 and all(np.isfinite(train_losses))
    if estimator == "backprop":  # exact gradients: the training loss falls
        assert train_losses[-1] < train_losses[0]
