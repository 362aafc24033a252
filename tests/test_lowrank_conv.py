"""Factorised convolutions and OIALR on the ResNet, against dense nnx.Conv oracles and float64 SVDs."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalgo import cli, lowrank
from jaxalgo.models import build_model, split_chain

pytestmark = pytest.mark.filterwarnings("ignore:.*nnx.State. will be deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def normal(seed, shape, scale=1.0):
    """Test data from numpy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def tiny_resnet(seed=0):
    """ResNet (stem, two stages of 4 and 8 channels, head) on 8x8x1 inputs, float64 parameters, built abstractly."""
    make = lambda: build_model("resnet", input_shape=(8, 8, 1), num_outputs=3, key=jax.random.key(0), channels=(4, 8))
    fn, abstract = split_chain(nnx.eval_shape(make))
    leaves, treedef = jax.tree.flatten(abstract)
    params = [normal(seed + i, leaf.shape, 0.4) for i, leaf in enumerate(leaves)]
    return fn, jax.tree.unflatten(treedef, params)


def dense_matrix(values):
    """``U S V^T`` of a factorised layer's parameters, on the host."""
    u, s, v = (np.asarray(values[k]) for k in "USV")
    return u @ s @ v.T


def conv_kernels(params):
    """``{layer path: kernel}`` for every conv kernel of a dense resnet's parameters."""
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[-1] == "kernel" and leaf.ndim == 4:
            found["/".join(str(k) for k in keys[:-1])] = leaf
    return found


def test_resnet_convs_are_found_with_their_matrix_view():
    fn, params = tiny_resnet()
    layers = {info.name: (info.m, info.n) for info in lowrank.find_layers(fn, params)}
    # stem 3x3x1 -> 4; stage 1: 3x3x4 -> 4 twice; stage 2: 3x3x4 -> 8, 3x3x8 -> 8, 1x1x4 -> 8 projection; head 8x3.
    assert layers == {
        "0/conv": (9, 4),
        "1/conv1": (36, 4),
        "1/conv2": (36, 4),
        "2/conv1": (36, 8),
        "2/conv2": (72, 8),
        "2/proj_conv": (4, 8),
        "3/linear": (8, 3),
    }


def test_conv_conversion_is_exact_and_densify_restores_the_kernels():
    fn, params = tiny_resnet()
    fn2, p2, layers = lowrank.factorize_chain(fn, params)
    x = normal(50, (3, 8, 8, 1))
    for info in layers:
        values = lowrank.layer_params(p2, info)
        u, s, v = values["U"], values["S"], values["V"]
        assert u.shape == (info.m, info.full_rank) and v.shape == (info.n, info.full_rank)
        np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(info.full_rank), atol=1e-12)
        np.testing.assert_allclose(s, np.diag(np.diag(s)), atol=0)
    for name, kernel in conv_kernels(params).items():
        info = next(i for i in layers if i.name == name)
        values = lowrank.layer_params(p2, info)
        np.testing.assert_allclose(dense_matrix(values).reshape(kernel.shape), kernel, atol=1e-12)  # W == U S V^T
    np.testing.assert_allclose(jax.jit(fn2)(p2, x), jax.jit(fn)(params, x), atol=1e-10)
    fn3, p3 = lowrank.densify_chain(fn2, p2)
    assert jax.tree.structure(p3) == jax.tree.structure(params)
    chex.assert_trees_all_close(p3, params, atol=1e-12)
    np.testing.assert_allclose(jax.jit(fn3)(p3, x), jax.jit(fn)(params, x), atol=1e-12)


@pytest.mark.parametrize(
    ("strides", "padding", "kernel_dilation", "use_bias", "batch"),
    [
        (1, "SAME", 1, False, (2,)),
        ((2, 1), "VALID", (1, 2), True, (2,)),
        (2, ((1, 0), (2, 1)), 1, True, (2, 3)),  # explicit padding, two batch axes
    ],
)
def test_factored_conv_forward_equals_dense_conv_forward(strides, padding, kernel_dilation, use_bias, batch):
    kh, kw, c_in, c_out, rank = 3, 2, 5, 6, 2
    m = kh * kw * c_in
    dense = nnx.Conv(
        c_in,
        c_out,
        (kh, kw),
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        use_bias=use_bias,
        param_dtype=jnp.float64,
        rngs=nnx.Rngs(0),
    )
    u, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((m, rank)))
    v, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((c_out, rank)))
    s = np.random.default_rng(3).standard_normal((rank, rank))  # a dense S, as after training
    dense.kernel[...] = jnp.asarray((u @ s @ v.T).reshape(kh, kw, c_in, c_out))
    if use_bias:
        dense.bias[...] = normal(4, (c_out,))
    low = lowrank.LowRankConv.from_conv(dense, lowrank.Factors(jnp.asarray(u), jnp.asarray(s), jnp.asarray(v)))
    assert lowrank.factored_is_cheaper(m, c_out, rank)  # the factored path: conv with 2 channels, then S V^T
    x = normal(5, (*batch, 7, 9, c_in))
    np.testing.assert_allclose(low(x), dense(x), atol=1e-12)
    np.testing.assert_allclose(low.to_dense()(x), dense(x), atol=1e-12)
    # full rank (dense path): exact conversion of an arbitrary kernel
    kernel = normal(6, (kh, kw, c_in, c_out))
    dense.kernel[...] = kernel
    full = lowrank.LowRankConv.from_conv(dense, lowrank.factorize(lowrank.as_matrix(kernel, 3)))
    np.testing.assert_allclose(full(x), dense(x), atol=1e-11)


def test_factored_conv_uses_fewer_flops():
    fn, params = tiny_resnet()
    x = jnp.ones((16, 8, 8, 1))
    flops = lambda f, p: jax.jit(f).lower(p, x).compile().cost_analysis()["flops"]
    layers = lowrank.find_layers(fn, params)
    ranks = {i.name: (1, 1) for i in layers if i.name in ("1/conv1", "1/conv2", "2/conv1", "2/conv2")}
    fn_low, p_low, _ = lowrank.factorize_chain(fn, params, ranks=ranks)
    assert flops(fn_low, p_low) < 0.5 * flops(fn, params)


def test_convs_that_cannot_be_factorised_stay_dense():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.depthwise = nnx.Conv(4, 8, (3, 3), feature_group_count=4, rngs=rngs)
            self.circular = nnx.Conv(8, 8, (3, 3), padding="CIRCULAR", rngs=rngs)
            self.plain = nnx.Conv(8, 8, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.plain(self.circular(self.depthwise(x)))

    from jaxalgo.models import Chain

    fn, params = split_chain(nnx.eval_shape(lambda: Chain([Block(nnx.Rngs(0))])))
    assert [info.name for info in lowrank.find_layers(fn, params)] == ["0/plain"]


def test_oialr_on_a_resnet_cuts_and_keeps_w_consistent():
    fn, params = tiny_resnet()
    tx = optax.adam(1e-2)
    config = lowrank.OIALRConfig(delay=0, stability_frequency=1, cutoff=0.5, window_growth=1.0, bucket_ratio=1.0)
    fn2, p2, opt_state, layers, status = lowrank.convert(fn, params, tx.init(params), tx, config)
    x, y = normal(60, (8, 8, 8, 1)), jnp.asarray(np.eye(3)[np.arange(8) % 3])
    loss = lambda p: optax.softmax_cross_entropy(fn2(p, x), y).mean()
    frozen = lowrank.freeze_factors(tx)

    @jax.jit
    def step(p, s):
        updates, s = frozen.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(3):  # S becomes dense, the bases stay put
        before = p2
        p2, opt_state = step(p2, opt_state)
    for info in layers:
        np.testing.assert_array_equal(lowrank.layer_params(p2, info)["U"], lowrank.layer_params(before, info)["U"])
    p3, s3, st3, report = lowrank.stability_check(p2, opt_state, tx, layers, status, config)
    cut = [name for name in report if report[name]["rank"] < report[name]["rank_before"]]
    assert any("conv" in name for name in cut), report
    for info in layers:
        values = lowrank.layer_params(p3, info)
        r = st3.ranks[info.name]
        assert values["S"].shape == (r, r) and values["U"].shape == (info.m, r)
        # W after the check is the best rank-r approximation of W before (rotation + cut by the SVD of S); an uncut
        # layer keeps W exactly
        w_before = dense_matrix(lowrank.layer_params(p2, info))
        u_, s_, vt_ = np.linalg.svd(w_before, full_matrices=False)
        np.testing.assert_allclose(report[info.name]["singular_values"], s_, atol=1e-10)
        best = (u_[:, :r] * s_[:r]) @ vt_[:r]
        np.testing.assert_allclose(dense_matrix(values), best, atol=1e-10)
    # the optimizer state follows the cut shapes and keeps its count
    chex.assert_trees_all_equal_shapes(s3[0].mu, lowrank.trainable_part(p3))
    assert int(s3[0].count) == 3


def test_cli_resnet_with_oialr(tmp_path):
    workdir = tmp_path / "run"
    argv = ["train", "--quiet", "--model", "resnet", "--epochs", "1", "--batch-size", "512", "--lowrank", "oialr"]
    # converted at step 0 and checked after the last step: one compiled training step, one evaluation
    argv += ["--lowrank-delay", "0", "--lowrank-frequency", "2", "--lowrank-cutoff", "0.9", "--workdir", str(workdir)]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    events = [line["event"] for line in lines if "event" in line]
    assert events == ["oialr_convert", "oialr_check"]
    final = lines[-1]
    assert final["final"] and final["steps"] == 2 and 0 <= final["test_accuracy"] <= 1
    ranks = final["lowrank_ranks"]
    assert {"0/conv", "1/conv1", "1/conv2", "2/conv1", "2/proj_conv", "3/conv2", "4/linear"} <= set(ranks)
    assert ranks["4/linear"] < 10  # the first check covers the output end and cuts it with cutoff 0.9
