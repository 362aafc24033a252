"""Tests of jaxalgo.models: shapes, the pure-function view, oracles for the forward passes, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalgo import models
from jaxalgo.models import (
    ACTIVATIONS,
    MODELS,
    Chain,
    SelfAttention,
    TransformerBlock,
    build_model,
    merge_chain,
    mlp,
    resnet,
    split_chain,
    vit,
)

IMAGE_SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
TINY = {
    "mlp": {"hidden": (8, 6)},
    "resnet": {"channels": (4, 8), "blocks_per_stage": 1},
    "vit": {"dim": 8, "depth": 1, "heads": 2, "mlp_dim": 16},
}
TINY_BLOCKS = {"mlp": 3, "resnet": 4, "vit": 3}
IMAGE_MODELS = tuple(name for name in MODELS if name != "cnn1d")  # cnn1d takes 1-D signals: tests/test_cnn1d.py
BATCH = 2


def _tiny(name, input_shape, num_outputs=5, seed=0, **overrides):
    options = {**TINY[name], **overrides}
    return build_model(name, input_shape=input_shape, num_outputs=num_outputs, key=jax.random.key(seed), **options)


def _inputs(shape, seed=1):
    # numpy draws: no XLA compilation per input shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal((BATCH, *shape)), jnp.float32)


def _abstract(builder, *args, **kwargs):
    """The model's shapes only (no parameter is drawn, nothing is compiled)."""
    return nnx.eval_shape(lambda: builder(*args, **kwargs))


# Calling a module under jit (modules are pytrees); compiled once per model structure and input shape.
_call = jax.jit(lambda module, x: module(x))


def _kernels(params):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if path[-1].key == "kernel"]


# ---------------------------------------------------------------- shapes and the chain view


@pytest.mark.parametrize(("name", "shape"), list(itertools.product(IMAGE_MODELS, IMAGE_SHAPES)))
def test_output_shapes_and_chain_view(name, shape):
    model = _tiny(name, shape)
    x = _inputs(shape)
    fn, params = split_chain(model)
    assert fn.num_blocks == len(params) == TINY_BLOCKS[name]

    @jax.jit
    def views(model, params, x):
        # The module, block by block, the whole chain, every block output and the re-merged module, in one
        # compilation (each compilation costs seconds on a small CPU).
        h, by_block = x, []
        for index in range(fn.num_blocks):
            h = fn.apply_block(index, params[index], h)
            by_block.append(h)
        applied = fn.apply(params, x)
        return model(x), applied, fn.block_outputs(params, x), by_block, merge_chain(fn, params)(x)

    y, applied, outputs, by_block, merged_out = views(model, params, x)
    assert y.shape == (BATCH, 5)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(applied, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged_out, applied)
    assert len(outputs) == fn.num_blocks
    np.testing.assert_array_equal(outputs[-1], applied)
    for a, b in zip(outputs, by_block, strict=True):
        np.testing.assert_array_equal(a, b)

    # merge_chain round-trips: same parameters, same structure.
    merged = merge_chain(fn, params)
    assert isinstance(merged, Chain)
    _, params2 = split_chain(merged)
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    # Stateless apart from nnx.Param.
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))


def test_mlp_on_vectors_and_default_sizes():
    fn, params = split_chain(_abstract(mlp, (30,), 4, key=jax.random.key(0)))
    assert [p["linear"]["kernel"].shape for p in params] == [(30, 256), (256, 256), (256, 4)]
    assert jax.eval_shape(fn.apply, params, _inputs((30,))).shape == (BATCH, 4)
    model = _tiny("mlp", (30,))
    assert _call(model, _inputs((30,))).shape == (BATCH, 5)


def test_resnet_stage_sizes_and_block_count():
    model = _abstract(resnet, (8, 8, 1), 3, channels=(4, 8, 8, 8), blocks_per_stage=2, key=jax.random.key(0))
    fn, params = split_chain(model)
    assert fn.num_blocks == 1 + 4 * 2 + 1
    shapes = [o.shape[1:] for o in jax.eval_shape(fn.block_outputs, params, _inputs((8, 8, 1)))]
    # 8 -> 4 -> 2, then no further downsampling: a map never goes below 2x2.
    assert shapes[:-1] == [(8, 8, 4), (8, 8, 4), (8, 8, 4), (4, 4, 8), (4, 4, 8)] + [(2, 2, 8)] * 4
    # A projection exactly where the shape changes.
    has_projection = ["proj_conv" in p for p in params[1:-1]]
    assert has_projection == [False, False, True, False, True, False, False, False]
    model = _abstract(resnet, (28, 28, 1), 3, channels=(4, 4, 4), key=jax.random.key(0))
    fn, params = split_chain(model)
    shapes = [o.shape[1:3] for o in jax.eval_shape(fn.block_outputs, params, _inputs((28, 28, 1)))[:-1]]
    assert shapes == [(28, 28), (28, 28), (14, 14), (7, 7)]


@pytest.mark.parametrize(("shape", "expected"), [((8, 8, 1), 2), ((28, 28, 1), 4), ((32, 32, 3), 4)])
def test_vit_default_patch_size(shape, expected):
    assert models.default_patch_size(*shape[:2]) == expected
    _, params = split_chain(_abstract(_tiny, "vit", shape))
    tokens = (shape[0] // expected) * (shape[1] // expected)
    assert params[0]["position"].shape == (tokens, 8)
    assert params[0]["linear"]["kernel"].shape == (expected * expected * shape[2], 8)


def test_same_key_same_params_different_key_different_params():
    for name in IMAGE_MODELS:
        _, a = split_chain(_tiny(name, (8, 8, 1), seed=3))
        _, b = split_chain(_tiny(name, (8, 8, 1), seed=3))
        _, c = split_chain(_tiny(name, (8, 8, 1), seed=4))
        jax.tree.map(np.testing.assert_array_equal, a, b)
        kernels_a, kernels_c = _kernels(a), _kernels(c)
        assert all(not np.array_equal(ka, kc) for (_, ka), (_, kc) in zip(kernels_a, kernels_c, strict=True))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_kernel_is_2d_or_4d(name):
    _, params = split_chain(_tiny(name, (8, 8, 1)))
    kernels = _kernels(params)
    assert kernels
    for path, kernel in kernels:
        assert kernel.ndim in (2, 4), (path, kernel.shape)
    if name == "resnet":
        assert {k.ndim for _, k in kernels} == {2, 4}  # convs and the dense head
    else:
        assert {k.ndim for _, k in kernels} == {2}


def test_build_model_matches_the_builders():
    key = jax.random.key(7)
    builders = {"mlp": mlp, "resnet": resnet, "vit": vit}
    for name in IMAGE_MODELS:
        built = build_model(name, input_shape=(8, 8, 1), num_outputs=5, key=key, **TINY[name])
        direct = builders[name]((8, 8, 1), 5, key=key, **TINY[name])
        jax.tree.map(np.testing.assert_array_equal, split_chain(built)[1], split_chain(direct)[1])


# ---------------------------------------------------------------- independent oracles


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_mlp_matches_numpy_forward(activation):
    numpy_act = {
        "tanh": np.tanh,
        "relu": lambda a: np.maximum(a, 0.0),
        "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    }[activation]
    model = mlp((4, 3, 2), 5, hidden=(7, 6), activation=activation, key=jax.random.key(0))
    x = np.asarray(_inputs((4, 3, 2)), np.float64)
    _, params = split_chain(model)
    h = x.reshape(BATCH, -1)
    for index, block in enumerate(params):
        kernel = np.asarray(block["linear"]["kernel"], np.float64)
        bias = np.asarray(block["linear"]["bias"], np.float64)
        h = h @ kernel + bias
        if index < len(params) - 1:
            h = numpy_act(h)
    np.testing.assert_allclose(_call(model, jnp.asarray(x, jnp.float32)), h, rtol=1e-5, atol=1e-5)


def _numpy_attention(params, x, heads):
    """Per-head softmax attention written with numpy loops, from the projection weights."""

    def project(name, h):
        return h @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)

    n, tokens, dim = x.shape
    d = dim // heads
    q, k, v = project("query", x), project("key", x), project("value", x)
    out = np.zeros((n, tokens, dim))
    for b in range(n):
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / np.sqrt(d)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            out[b, :, cols] = scores @ v[b, :, cols]
    return project("out", out)


def test_attention_matches_numpy_softmax_attention():
    attention = SelfAttention(12, 3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).standard_normal((2, 5, 12))
    params = nnx.to_pure_dict(nnx.state(attention))
    expected = _numpy_attention(params, x, heads=3)
    np.testing.assert_allclose(_call(attention, jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-5)


def test_transformer_block_matches_numpy_and_is_permutation_equivariant():
    block = TransformerBlock(8, 2, 16, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 8)), jnp.float32)
    y = _call(block, x)

    # Oracle: pre-LN residual block written with numpy.
    p = nnx.to_pure_dict(nnx.state(block))
    xn = np.asarray(x, np.float64)

    def layer_norm(h, q):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-6) * np.asarray(q["scale"]) + np.asarray(q["bias"])

    def dense(h, q):
        return h @ np.asarray(q["kernel"], np.float64) + np.asarray(q["bias"], np.float64)

    from math import erf

    gelu = np.vectorize(lambda a: 0.5 * a * (1.0 + erf(a / np.sqrt(2.0))))
    u = xn + _numpy_attention(p["attention"], layer_norm(xn, p["norm1"]), heads=2)
    expected = u + dense(gelu(dense(layer_norm(u, p["norm2"]), p["mlp_in"])), p["mlp_out"])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)

    # Permuting the tokens permutes the output the same way.
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(_call(block, x[:, perm]), y[:, perm], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, perm], y, atol=1e-3)  # the permutation does change the sequence


def test_patch_embedding_matches_numpy_patches():
    fn, params = split_chain(vit((4, 6, 2), 3, patch_size=2, **TINY["vit"], key=jax.random.key(0)))
    x = np.asarray(_inputs((4, 6, 2)), np.float64)
    embed = params[0]
    rows = []
    for i in range(2):
        for j in range(3):
            rows.append(x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].reshape(BATCH, -1))
    patches = np.stack(rows, axis=1)  # (N, 6 tokens, 2*2*2)
    expected = patches @ np.asarray(embed["linear"]["kernel"]) + np.asarray(embed["linear"]["bias"])
    expected += np.asarray(embed["position"])
    np.testing.assert_allclose(
        jax.jit(fn.apply_block, static_argnums=0)(0, embed, jnp.asarray(x, jnp.float32)), expected, atol=1e-5
    )


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_gradients_through_pure_function_are_finite_and_structured(name):
    fn, params = split_chain(_tiny(name, (8, 8, 1)))
    x = _inputs((8, 8, 1))
    labels = jnp.arange(BATCH) % 5

    def loss(p):
        logits = fn.apply(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert bool(jnp.all(jnp.isfinite(g)))
    # Every kernel receives a gradient signal.
    for path, g in _kernels(grads):
        assert float(jnp.max(jnp.abs(g))) > 0.0, path
    # Oracle: a central finite difference along a random direction, computed in float64.
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(5)
    direction = [rng.standard_normal(p.shape) for p in leaves]
    directional = sum(
        float(np.vdot(np.asarray(g, np.float64), d)) for g, d in zip(jax.tree.leaves(grads), direction, strict=True)
    )
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        loss64 = jax.jit(loss)
        eps = 1e-5

        def shifted(sign):
            moved = [np.asarray(p, np.float64) + sign * eps * d for p, d in zip(leaves, direction, strict=True)]
            return loss64(jax.tree.unflatten(treedef, moved))

        x = jnp.asarray(x, jnp.float64)
        finite_difference = float((shifted(1.0) - shifted(-1.0)) / (2 * eps))
    finally:
        jax.config.update("jax_enable_x64", previous)
    np.testing.assert_allclose(directional, finite_difference, rtol=1e-3, atol=1e-5)


def test_activations_table():
    assert {"relu", "tanh", "gelu", "sigmoid", "silu", "identity"} <= set(ACTIVATIONS)
    a = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_allclose(ACTIVATIONS["identity"](a), a)
    np.testing.assert_allclose(ACTIVATIONS["silu"](a), a / (1 + np.exp(-np.asarray(a))), rtol=1e-6)
    with pytest.raises(TypeError):
        ACTIVATIONS["new"] = jnp.abs  # read-only


# ---------------------------------------------------------------- bad input


KEY = jax.random.key(0)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: build_model("mlpp", input_shape=(4,), num_outputs=2, key=KEY),
            ValueError,
            r"model: unknown model 'mlpp'.*mlp, resnet, vit",
        ),
        (
            lambda: build_model("mlp", input_shape=(4,), num_outputs=2, key=KEY, depth=2),
            TypeError,
            r"'depth'.*hidden, activation",
        ),
        (
            lambda: build_model("vit", input_shape=(8, 8, 1), num_outputs=2, key=KEY, hidden=(3,)),
            TypeError,
            r"'hidden'.*patch_size",
        ),
        (lambda: mlp((4,), 2, activation="swish2", key=KEY), ValueError, r"activation.*'swish2'.*relu"),
        (lambda: mlp((4,), 2, hidden=(), key=KEY), ValueError, r"hidden.*\(\)"),
        (lambda: mlp((4,), 2, hidden=(8, 0), key=KEY), ValueError, r"hidden.*\(8, 0\).*positive integers"),
        (lambda: mlp((4,), 2, hidden=(8, -3), key=KEY), ValueError, r"hidden.*-3"),
        (lambda: mlp((4,), 2, hidden=8, key=KEY), TypeError, r"hidden.*8.*sequence"),
        (lambda: mlp((4,), 0, key=KEY), ValueError, r"num_outputs.*got 0.*>= 1"),
        (lambda: resnet((8, 8, 1), -1, key=KEY), ValueError, r"num_outputs.*-1"),
        (lambda: vit((8, 8, 1), 0, key=KEY), ValueError, r"num_outputs.*0"),
        (lambda: mlp((4,), 2.5, key=KEY), TypeError, r"num_outputs.*2.5"),
        (lambda: mlp((0, 3), 2, key=KEY), ValueError, r"input_shape.*\(0, 3\)"),
        (lambda: resnet((30,), 2, key=KEY), ValueError, r"input_shape.*\(30,\).*\(height, width, channels\)"),
        (lambda: vit((30,), 2, key=KEY), ValueError, r"input_shape.*\(30,\).*\(height, width, channels\)"),
        (lambda: resnet((8, 8, 1), 2, channels=(4, 0), key=KEY), ValueError, r"channels.*\(4, 0\)"),
        (lambda: resnet((8, 8, 1), 2, blocks_per_stage=0, key=KEY), ValueError, r"blocks_per_stage.*0"),
        (lambda: vit((8, 8, 1), 2, patch_size=3, key=KEY), ValueError, r"patch_size.*3.*8x8.*divisor"),
        (lambda: vit((28, 28, 1), 2, patch_size=0, key=KEY), ValueError, r"patch_size.*0"),
        (lambda: vit((8, 8, 1), 2, dim=10, heads=4, key=KEY), ValueError, r"dim.*10.*heads=4"),
        (lambda: vit((8, 8, 1), 2, depth=0, key=KEY), ValueError, r"depth.*0"),
        (lambda: mlp((4,), 2, key=0), TypeError, r"key.*jax.random.key"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
