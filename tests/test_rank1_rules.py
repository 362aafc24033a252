"""Rank-1 forward rules: each equals ``jax.jvp`` with the materialised tangent ``a b^T``, and stays factored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalgo.grads._rank1_jvp import jvp_stacked
from jaxalgo.grads._rank1_tangents import FactoredTangent, gram_matrix, sample_tangents, tangent_keys
from jaxalgo.models import Chain, split_chain

K = 3


@jax.jit
def draw(key, leaves):
    return sample_tangents(tangent_keys(key, K), leaves)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _materialize(t):
    return t.materialize() if isinstance(t, FactoredTangent) else t


def check_against_jvp(fun, args, *, seed=0, expect_factored_all_the_way=True, rtol=1e-10, first="rank1"):
    """Stacked jvp with rank-1 tangents on every float leaf == jax.jvp with each materialised tangent.

    ``first`` is the tangent of the first argument (the data): "rank1", "dense" (Gaussian) or "none".
    Everything runs in one jit (XLA compiles dominate the run time of such small tests).
    """
    fallbacks: list[str] = []

    @jax.jit
    def run(args):
        leaves, treedef = jax.tree.flatten(args)
        tangents = sample_tangents(tangent_keys(jax.random.key(seed), K), leaves)
        num_first = len(jax.tree.leaves(args[0]))
        if first == "dense":
            tangents[:num_first] = [_materialize(t) for t in tangents[:num_first]]
        elif first == "none":
            tangents[:num_first] = [None] * num_first
        out, out_t = jvp_stacked(fun, args, tangents, fallbacks=fallbacks)
        dense = [
            jnp.zeros((K, *x.shape), x.dtype) if t is None else _materialize(t)
            for x, t in zip(leaves, tangents, strict=True)
        ]
        ref_out, ref_t = jax.vmap(lambda t: jax.jvp(fun, tuple(args), tuple(jax.tree.unflatten(treedef, t))))(dense)
        return out, _materialize(out_t[0]), ref_out, ref_t

    out, out_t, ref_out, ref_t = run(args)
    np.testing.assert_allclose(ref_out, jnp.broadcast_to(out, ref_out.shape), rtol=1e-12)
    np.testing.assert_allclose(out_t, ref_t, rtol=rtol, atol=1e-10)
    if expect_factored_all_the_way:
        assert fallbacks == []
    return fallbacks


def normal(seed, shape, scale=1.0):
    """Test data from numpy (no XLA compile, which costs about a second each on a small CPU)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def test_factored_tangent_is_rank1_and_materialize_matches_outer_product():
    w = normal(0, (4, 5))
    (t,) = draw(jax.random.key(1), [w])
    assert isinstance(t, FactoredTangent) and [f.shape for f in t.factors] == [(K, 4), (K, 5)]
    dense = t.materialize()
    for i in range(K):
        np.testing.assert_allclose(dense[i], jnp.outer(t.factors[0][i], t.factors[1][i]))
        assert np.linalg.matrix_rank(np.asarray(dense[i])) == 1
    flat = dense.reshape(K, -1)
    np.testing.assert_allclose(gram_matrix([t], jnp.float64), flat @ flat.T, rtol=1e-12)


def test_tangent_i_is_the_same_drawn_alone_or_together():
    leaves = [normal(0, (4, 5)), normal(1, (5,)), normal(2, (2, 3, 3, 4))]

    @jax.jit
    def draw_both(leaves):
        keys = tangent_keys(jax.random.key(3), K)
        together = [_materialize(t) for t in sample_tangents(keys, leaves)]
        alone = [[_materialize(t)[0] for t in sample_tangents(keys[i : i + 1], leaves)] for i in range(K)]
        return together, alone

    together, alone = draw_both(leaves)
    for i in range(K):
        for a, b in zip(together, alone[i], strict=True):
            np.testing.assert_array_equal(a[i], b)


def test_dense_kernel_rhs():
    check_against_jvp(lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2), (normal(0, (6, 4)), normal(1, (4, 5))))


def test_dense_kernel_lhs_through_transpose():
    check_against_jvp(lambda x, w: jnp.sum(jnp.sin(w.T @ x.T)), (normal(0, (6, 4)), normal(1, (4, 5))))


def test_einsum_kernel_first_operand():
    check_against_jvp(lambda x, w: jnp.sum(jnp.einsum("io,bi->bo", w, x) ** 3), (normal(0, (6, 4)), normal(1, (4, 5))))


def test_attention_style_3d_kernels_and_batch_dims():
    def f(x, wq, wo):
        q = jnp.einsum("btd,dhe->bthe", x, wq)
        s = jnp.einsum("bthe,bshe->bhts", q, q)
        y = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s), q)
        return jnp.sum(jnp.einsum("bthe,heo->bto", y, wo) ** 2)

    check_against_jvp(f, (normal(0, (2, 3, 4)), normal(1, (4, 2, 3)), normal(2, (2, 3, 4))))


@pytest.mark.parametrize(
    ("strides", "padding", "dilation"),
    [((1, 1), "SAME", (1, 1)), ((2, 2), "VALID", (1, 1)), ((1, 2), ((1, 0), (2, 1)), (2, 1))],
)
def test_conv_hwio_kernel_is_a_single_channel_conv_then_a_scale(strides, padding, dilation):
    def f(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jax.nn.gelu(y))

    check_against_jvp(f, (normal(0, (2, 7, 6, 3)), normal(1, (3, 2, 3, 5))), first="dense")


def test_conv_with_out_channels_first_falls_back_and_is_still_exact():
    def f(x, w):  # OIHW kernel: the rank-1 view (O I H) x (W) does not match the conv rule.
        return jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))

    fallbacks = check_against_jvp(
        f, (normal(0, (2, 3, 5, 5)), normal(1, (4, 3, 3, 3))), expect_factored_all_the_way=0, first="dense"
    )
    assert len(fallbacks) == 1 and fallbacks[0].startswith("conv_general_dilated")


def test_depthwise_conv_falls_back_and_is_still_exact():
    def f(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3
        )
        return jnp.sum(y**2)

    fallbacks = check_against_jvp(
        f, (normal(0, (2, 5, 5, 3)), normal(1, (3, 3, 1, 6))), expect_factored_all_the_way=0, first="dense"
    )
    assert [line.split(":")[0] for line in fallbacks] == ["conv_general_dilated"]


def test_dtype_conversion_follows_the_factors():
    def f(x, w):
        return jnp.sum(jnp.cos(x.astype(jnp.float32) @ w.astype(jnp.float32))).astype(jnp.float64)

    check_against_jvp(f, (normal(0, (3, 4)), normal(1, (4, 2))), rtol=1e-5)


def test_reshape_of_a_weight_falls_back_and_is_still_exact():
    fallbacks = check_against_jvp(
        lambda x, w: jnp.sum(jnp.tanh(x @ w.reshape(4, 6))),
        (normal(0, (3, 4)), normal(1, (2, 12))),
        expect_factored_all_the_way=0,
    )
    assert [line.split(":")[0] for line in fallbacks] == ["reshape"]


def test_weight_inside_jit_is_followed_into_the_subjaxpr():
    inner = jax.jit(lambda x, w: jax.nn.relu(x @ w))
    check_against_jvp(lambda x, w: jnp.sum(inner(x, w) ** 2), (normal(0, (3, 4)), normal(1, (4, 2))))


def test_custom_vjp_function_is_differentiated_through_its_primal():
    @jax.custom_vjp
    def scaled_tanh(x):
        return 2.0 * jnp.tanh(x)

    scaled_tanh.defvjp(lambda x: (scaled_tanh(x), x), lambda x, g: (g,))  # deliberately wrong backward
    with pytest.raises(TypeError):
        jax.jvp(scaled_tanh, (1.0,), (1.0,))
    leaves = [normal(0, (3, 4)), normal(1, (4, 2))]
    tangents = draw(jax.random.key(0), leaves)
    _, out_t = jax.jit(lambda a, t: jvp_stacked(lambda x, w: jnp.sum(scaled_tanh(x @ w)), a, t))(leaves, tangents)
    plain = lambda x, w: jnp.sum(2.0 * jnp.tanh(x @ w))
    for i in range(K):
        _, ref = jax.jvp(plain, tuple(leaves), tuple(_materialize(t)[i] for t in tangents))
        np.testing.assert_allclose(out_t[0][i], ref, rtol=1e-12)


class _Dense(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.linear(x))


class _ConvBlock(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=(2, 2), rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=1, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.norm(self.conv(x)))


class _AttentionBlock(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attention(h, h, h)
        return x + jax.nn.gelu(self.mlp(x))


class _Head(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


def _blocks(kind, rngs):
    if kind == "mlp":
        return [_Dense(5, 8, rngs=rngs), _Dense(8, 8, rngs=rngs), _Head(8, 3, rngs=rngs)]
    if kind == "conv":
        return [_ConvBlock(2, 4, rngs=rngs), _ConvBlock(4, 4, rngs=rngs), _Head(2 * 2 * 4, 3, rngs=rngs)]
    return [_AttentionBlock(8, 2, rngs=rngs), _Head(3 * 8, 3, rngs=rngs)]


def abstract_chain_with_numpy_params(make_chain):
    """A chain's pure function and float64 parameters, built without running any XLA computation."""
    fn, abstract = split_chain(nnx.eval_shape(make_chain))
    leaves, treedef = jax.tree.flatten(abstract)
    return fn, jax.tree.unflatten(treedef, [normal(i, leaf.shape, 0.5) for i, leaf in enumerate(leaves)])


@pytest.mark.filterwarnings("ignore:`flax.nnx.State` will be deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["mlp", "conv", "attention"])
def test_whole_chain_directional_derivatives_equal_jvp_with_materialised_tangents(kind):
    fn, params = abstract_chain_with_numpy_params(lambda: Chain(_blocks(kind, nnx.Rngs(0))))
    x_shape = {"mlp": (4, 5), "conv": (2, 8, 8, 2), "attention": (2, 3, 8)}[kind]
    x = normal(100, x_shape)
    y = jnp.asarray(np.eye(3)[np.arange(x_shape[0]) % 3])

    def loss(x, params):
        return jnp.mean(-jnp.sum(jax.nn.log_softmax(fn.apply(params, x)) * y, axis=-1))

    check_against_jvp(loss, (x, params), first="none")


def test_unit_axis_reshape_keeps_the_factors():
    def f(x, w):  # a 2-D "bias" broadcast over a leading axis, then squeezed back.
        return jnp.sum(jnp.tanh(x + w.reshape(1, 3, 1, 4)).reshape(2, 3, 4) ** 2)

    check_against_jvp(f, (normal(0, (2, 3, 1, 4)), normal(1, (3, 4))), first="dense")


def test_broadcast_of_a_weight_keeps_the_factors():
    def f(x, pos, w):  # a (tokens, dim) position embedding added to a batch, and a broadcast from a unit axis
        h = x + pos
        return jnp.sum(jnp.tanh(h + jnp.broadcast_to(w, (2, 3, 4))) ** 2)

    check_against_jvp(f, (normal(0, (2, 3, 4)), normal(1, (3, 4)), normal(2, (2, 1, 4))), first="dense")


def test_replicated_weight_inside_shard_map_keeps_the_factors():
    """Inside ``shard_map``, a weight the same on every device meets per-device data through a ``pvary``
    equation; its tangent stays factored through it, and every device's directional derivatives equal jax.jvp's."""
    mesh = jax.make_mesh((4,), ("dp",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(normal(0, (8, 5)), jax.NamedSharding(mesh, jax.P("dp")))
    w = jax.device_put(normal(1, (5, 3)), jax.NamedSharding(mesh, jax.P()))
    fallbacks: list[str] = []

    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    def body(w, x):
        assert "pvary" in str(jax.make_jaxpr(f)(w, x))  # the equation this test is about
        (tangent,) = sample_tangents(tangent_keys(jax.random.key(0), K), [w])
        _, (out_t,) = jvp_stacked(f, (w, x), [tangent, None], fallbacks=fallbacks)
        ref = jax.vmap(lambda t: jax.jvp(f, (w, x), (t, jnp.zeros_like(x)))[1])(tangent.materialize())
        return out_t[None], ref[None]

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(jax.P(), jax.P("dp")), out_specs=jax.P("dp")))
    got, ref = (np.asarray(v) for v in run(w, x))
    assert fallbacks == []
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert not np.allclose(got[0], got[1])  # each device's own data
