"""Low-rank factorisation and OIALR steps against independent oracles (float64 SVDs, dense forward passes)."""

from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalgo import lowrank
from jaxalgo.models import Chain, split_chain

# split_chain on main still calls the deprecated State.to_pure_dict (the models branch owns that file).
pytestmark = pytest.mark.filterwarnings("ignore:.*nnx.State. will be deprecated:DeprecationWarning")


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


class AttentionBlock(nnx.Module):
    """A small pre-LayerNorm transformer block (attention projections are nnx.LinearGeneral)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = nnx.LayerNorm(dim, param_dtype=dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=dim, decode=False, param_dtype=dtype, rngs=rngs
        )
        self.up = nnx.Linear(dim, 2 * dim, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.down(jax.nn.gelu(self.up(x)))


def mlp_chain(widths=(12, 24, 24, 3), dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    blocks = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        blocks.append(nnx.Linear(a, b, param_dtype=dtype, rngs=rngs))
        if i < len(widths) - 2:
            blocks.append(nnx.Sequential(jax.nn.tanh))
    return split_chain(Chain(blocks))


def vit_like_chain(dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    chain = Chain([nnx.Linear(6, 16, param_dtype=dtype, rngs=rngs), AttentionBlock(16, rngs=rngs, dtype=dtype)])
    return split_chain(chain)


# -- factorisation ------------------------------------------------------------------------------------------------


def test_conversion_is_exact_and_bases_orthonormal(x64):
    w = jax.random.normal(jax.random.key(0), (7, 5), jnp.float64)
    u, s, v = lowrank.factorize(w)
    np.testing.assert_allclose(u @ s @ v.T, w, atol=1e-12)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(s, np.diag(np.diag(s)), atol=0)
    a, b = lowrank.ab_factors(w)
    np.testing.assert_allclose(a @ b, w, atol=1e-12)


def test_truncation_is_the_best_rank_r_approximation(x64):
    w = jax.random.normal(jax.random.key(1), (9, 6), jnp.float64)
    sv = np.linalg.svd(np.asarray(w), compute_uv=False)
    for r in (1, 3, 5):
        err = np.linalg.norm(np.asarray(lowrank.compose(lowrank.factorize(w, r))) - np.asarray(w), 2)
        np.testing.assert_allclose(err, sv[r], rtol=1e-10)  # Eckart-Young: spectral error = s_{r+1}


def test_as_matrix_views_conv_and_attention_kernels():
    k = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    assert lowrank.as_matrix(k, 3).shape == (24, 5)
    assert lowrank.as_matrix(k, 1).shape == (2, 60)
    np.testing.assert_array_equal(lowrank.as_matrix(k, 3)[7], k.reshape(24, 5)[7])


def test_factored_chain_equals_dense_chain_mlp_and_attention(x64):
    for fn, params, x in (
        (*mlp_chain(dtype=jnp.float64), jax.random.normal(jax.random.key(2), (5, 12), jnp.float64)),
        (*vit_like_chain(dtype=jnp.float64), jax.random.normal(jax.random.key(3), (3, 4, 6), jnp.float64)),
    ):
        fn2, p2, layers = lowrank.factorize_chain(fn, params)
        assert layers
        np.testing.assert_allclose(jax.jit(fn2)(p2, x), jax.jit(fn)(params, x), atol=1e-10)
        _fn3, p3 = lowrank.densify_chain(fn2, p2)
        assert jax.tree.structure(p3) == jax.tree.structure(params)
        chex.assert_trees_all_close(p3, params, atol=1e-10)


def test_attention_projections_are_converted():
    fn, params = vit_like_chain()
    names = {info.name for info in lowrank.find_layers(fn, params)}
    assert {"1/attention/query", "1/attention/key", "1/attention/value", "1/attention/out"} <= names
    assert {"0", "1/up", "1/down"} <= names


def test_eligibility_excludes_thin_layers():
    fn, params = mlp_chain(widths=(64, 256, 10))
    names = [info.name for info in lowrank.find_layers(fn, params)]
    assert names == ["0"]  # 256x10: 10 <= 256/10, not eligible


def test_truncated_factored_forward_equals_dense_forward_of_the_truncated_weight(x64):
    fn, params = mlp_chain(widths=(40, 48, 3), dtype=jnp.float64)
    fn2, p2, _layers = lowrank.factorize_chain(fn, params, ranks={"0": (4, 6)})
    assert lowrank.factored_is_cheaper(40, 48, 6)
    w = lowrank.compose(lowrank.factorize(params[0]["kernel"], 4))
    dense = {**params[0], "kernel": w}
    x = jax.random.normal(jax.random.key(4), (5, 40), jnp.float64)
    np.testing.assert_allclose(jax.jit(fn2)(p2, x), jax.jit(fn)((dense, *params[1:]), x), atol=1e-10)


def test_factored_forward_uses_fewer_flops():
    fn, params = mlp_chain(widths=(128, 128, 3))
    x = jnp.ones((32, 128))
    flops = lambda f, p: jax.jit(f).lower(p, x).compile().cost_analysis()["flops"]
    _, _p_full, _ = lowrank.factorize_chain(fn, params)
    fn_low, p_low, _ = lowrank.factorize_chain(fn, params, ranks={"0": (8, 8)})
    dense, low = flops(fn, params), flops(fn_low, p_low)
    assert low < 0.3 * dense, (low, dense)


def test_zero_padding_to_a_bucket_changes_nothing_and_gets_zero_gradients(x64):
    fn, params = mlp_chain(widths=(20, 16, 3), dtype=jnp.float64)
    fn_a, p_a, _ = lowrank.factorize_chain(fn, params, ranks={"0": (5, 5)})
    fn_b, p_b, _ = lowrank.factorize_chain(fn, params, ranks={"0": (5, 9)})
    x = jax.random.normal(jax.random.key(5), (4, 20), jnp.float64)
    np.testing.assert_allclose(jax.jit(fn_b)(p_b, x), jax.jit(fn_a)(p_a, x), atol=1e-12)
    g = jax.jit(jax.grad(lambda p: jnp.sum(fn_b(p, x) ** 2)))(p_b)[0]["S"]
    assert np.all(np.asarray(g)[5:, :] == 0) and np.all(np.asarray(g)[:, 5:] == 0)
    g_a = jax.jit(jax.grad(lambda p: jnp.sum(fn_a(p, x) ** 2)))(p_a)[0]["S"]
    np.testing.assert_allclose(g[:5, :5], g_a, atol=1e-12)


def test_rank_buckets_are_descending_and_bounded():
    b = lowrank.rank_buckets(256, 1.25)
    assert b[0] == 256 and b[-1] == 1 and all(x > y for x, y in itertools.pairwise(b))
    assert len(b) <= math.log(256) / math.log(1.25) + 2
    assert lowrank.bucket_size(100, 256, 1.25) >= 100
    assert lowrank.rank_buckets(5, 1.0) == (5, 4, 3, 2, 1)


# -- OIALR rules --------------------------------------------------------------------------------------------------


def test_cutoff_rank_is_first_index_below_threshold():
    s = np.array([10.0, 9.0, 5.0, 2.0, 1.6, 1.4, 0.5])
    assert lowrank.cutoff_rank(s, 0.15) == 5  # 1.4 < 1.5 at index 5
    assert lowrank.cutoff_rank(s, 0.01) == 7
    assert lowrank.cutoff_rank(s, 0.95) == 1


def test_limited_rank_rules():
    assert lowrank.limited_rank(10, 2) == 5  # at most half per check
    assert lowrank.limited_rank(11, 2) == 6  # floor(11/2) = 5 cut at most
    assert lowrank.limited_rank(10, 7) == 7
    assert lowrank.limited_rank(10, 12) == 10  # never grows
    assert lowrank.limited_rank(10, 2, min_rank=8) == 8
    assert lowrank.limited_rank(3, 1, min_rank=5) == 3  # already below the floor: stays


def test_check_window_grows_from_the_output_end():
    layers = tuple(range(10))
    assert lowrank.check_window(layers, 1, 0.1) == (9,)
    assert lowrank.check_window(layers, 3, 0.1) == (7, 8, 9)
    assert lowrank.check_window(layers, 12, 0.1) == layers
    assert lowrank.check_window(layers[:3], 1, 0.1) == (2,)


def _converted(widths=(24, 20, 2), dtype=jnp.float64, tx=None):
    fn, params = mlp_chain(widths=widths, dtype=dtype)
    tx = tx or optax.adam(1e-2)
    opt_state = tx.init(params)
    opt_state = optax.tree_utils.tree_set(opt_state, count=jnp.asarray(37, jnp.int32))
    config = lowrank.OIALRConfig(delay=0, stability_frequency=1, cutoff=0.15, window_growth=1.0, bucket_ratio=1.0)
    fn2, p2, s2, layers, status = lowrank.convert(fn, params, opt_state, tx, config)
    return fn, params, fn2, p2, s2, layers, status, tx, config


def test_convert_keeps_count_and_zeroes_moments(x64):
    _, _, _, p2, s2, layers, status, _, _ = _converted()
    assert [i.name for i in layers] == ["0"] and status.ranks == {"0": 20}
    adam = s2[0]
    assert int(adam.count) == 37
    assert "U" not in adam.mu[0] and "V" not in adam.mu[0]  # frozen bases carry no moments
    assert adam.mu[0]["S"].shape == (20, 20) and float(jnp.abs(adam.mu[0]["S"]).max()) == 0.0
    assert adam.mu[0]["bias"].shape == p2[0]["bias"].shape


def _with_dense_s(p2, key=6):
    """Simulates training: a dense S with a chosen spectrum."""
    s = p2[0]["S"]
    r = s.shape[0]
    q1, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(key), (r, r), s.dtype))
    q2, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(key + 1), (r, r), s.dtype))
    spectrum = jnp.concatenate([jnp.array([10.0, 8.0, 6.0, 4.0, 2.0, 1.6]), jnp.full((r - 6,), 0.4)]).astype(s.dtype)
    dense = q1 @ jnp.diag(spectrum) @ q2.T
    return lowrank.with_layer_params(p2, lowrank.LayerInfo(0, (), 0, 0, 0), {**p2[0], "S": dense}), spectrum


def test_rotation_leaves_w_unchanged(x64):
    _, _, _fn2, p2, s2, layers, status, tx, _ = _converted()
    p2, spectrum = _with_dense_s(p2)
    w_before = lowrank.compose(lowrank.Factors(p2[0]["U"], p2[0]["S"], p2[0]["V"]))
    no_cut = lowrank.OIALRConfig(cutoff=1e-6, window_growth=1.0)
    p3, _, st3, _ = lowrank.stability_check(p2, s2, tx, layers, status, no_cut)
    assert st3.ranks == status.ranks
    u, s, v = p3[0]["U"], p3[0]["S"], p3[0]["V"]
    np.testing.assert_allclose(lowrank.compose(lowrank.Factors(u, s, v)), w_before, atol=1e-10)
    np.testing.assert_allclose(s, jnp.diag(spectrum), atol=1e-10)  # S became diagonal
    np.testing.assert_allclose(u.T @ u, np.eye(20), atol=1e-10)
    np.testing.assert_allclose(v.T @ v, np.eye(20), atol=1e-10)


def test_cut_keeps_exactly_the_singular_values_above_the_cutoff(x64):
    _, _, _fn2, p2, s2, layers, status, tx, config = _converted()
    p2, spectrum = _with_dense_s(p2)
    w = np.asarray(lowrank.compose(lowrank.Factors(p2[0]["U"], p2[0]["S"], p2[0]["V"])))
    # cutoff 0.15 of s_0 = 10 is 1.5: 10, 8, 6, 4, 2, 1.6 stay (6 values); half of 20 may go, so 6 is allowed... no:
    # at most floor(20/2) = 10 cut per check, so the rank is max(6, 10) = 10.
    p3, s3, st3, report = lowrank.stability_check(p2, s2, tx, layers, status, config)
    assert st3.ranks["0"] == 10 and p3[0]["S"].shape == (10, 10)
    np.testing.assert_allclose(report["0"]["singular_values"], spectrum, atol=1e-10)
    # second check: 10 -> 6, exactly the values >= 1.5
    p4, _s4, st4, _ = lowrank.stability_check(p3, s3, tx, layers, st3, config)
    assert st4.ranks["0"] == 6 and st4.checks == 2
    np.testing.assert_allclose(np.diag(np.asarray(p4[0]["S"])), spectrum[:6], atol=1e-10)
    u, s_, vt = np.linalg.svd(w)
    best6 = (u[:, :6] * s_[:6]) @ vt[:6]
    np.testing.assert_allclose(lowrank.compose(lowrank.Factors(p4[0]["U"], p4[0]["S"], p4[0]["V"])), best6, atol=1e-9)
    # the floor: 1% of 20 rounds up to 1; with min_rank_fraction 0.5 the rank stops at 10
    floor = lowrank.OIALRConfig(cutoff=0.15, window_growth=1.0, min_rank_fraction=0.5, bucket_ratio=1.0)
    _, _, st5, _ = lowrank.stability_check(p3, s3, tx, layers, st3, floor)
    assert st5.ranks["0"] == 10


def test_optimizer_state_follows_the_cut_and_keeps_the_count(x64):
    _fn, _params, fn2, p2, s2, layers, status, tx, config = _converted()
    p2, _ = _with_dense_s(p2)
    # give the moments content by taking real optimizer steps on the factorised model
    frozen = lowrank.freeze_factors(tx)
    x = jax.random.normal(jax.random.key(8), (6, 24), jnp.float64)
    loss = lambda p: jnp.sum(fn2(p, x) ** 2)
    for _ in range(3):
        updates, s2 = jax.jit(frozen.update)(jax.jit(jax.grad(loss))(p2), s2, p2)
        p2 = optax.apply_updates(p2, updates)
    count = int(s2[0].count)
    mu_before, nu_before = s2[0].mu[0]["S"], s2[0].nu[0]["S"]
    p3, s3, st3, _ = lowrank.stability_check(p2, s2, tx, layers, status, config)
    r = st3.ranks["0"]
    assert int(s3[0].count) == count
    chex.assert_trees_all_equal_shapes(s3[0].mu, lowrank.trainable_part(p3))
    chex.assert_trees_all_equal_shapes(s3[0].nu, lowrank.trainable_part(p3))
    np.testing.assert_allclose(s3[0].mu[0]["S"], mu_before[:r, :r])  # reference behaviour: slice, no rotation
    # rotated moments: U_s^T M V_s and (U_s^2)^T N (V_s^2), then sliced
    rotate = lowrank.OIALRConfig(cutoff=0.15, window_growth=1.0, bucket_ratio=1.0, rotate_moments=True)
    _, s4, _, _ = lowrank.stability_check(p2, s2, tx, layers, status, rotate)
    us, _, vst = np.linalg.svd(np.asarray(p2[0]["S"]))
    np.testing.assert_allclose(s4[0].mu[0]["S"], (us.T @ np.asarray(mu_before) @ vst.T)[:r, :r], atol=1e-12)
    np.testing.assert_allclose(s4[0].nu[0]["S"], ((us**2).T @ np.asarray(nu_before) @ (vst.T**2))[:r, :r], atol=1e-12)
    # and the sliced state works with the cut parameters
    updates, _ = frozen.update(jax.grad(loss)(p3), s3, p3)
    chex.assert_trees_all_equal_shapes(updates, p3)


def test_frozen_bases_do_not_move_but_s_and_bias_train(x64):
    fn, params = mlp_chain(widths=(24, 20, 2), dtype=jnp.float64)
    fn2, p2, _ = lowrank.factorize_chain(fn, params)
    tx = lowrank.freeze_factors(optax.adamw(1e-2, weight_decay=0.1))
    state = tx.init(p2)
    x = jax.random.normal(jax.random.key(9), (6, 24), jnp.float64)
    grads = jax.grad(lambda p: jnp.sum(fn2(p, x) ** 2))(p2)
    assert float(jnp.abs(grads[0]["U"]).max()) == 0.0  # stop_gradient: backprop skips the bases
    updates, _ = tx.update(grads, state, p2)
    new = optax.apply_updates(p2, updates)
    np.testing.assert_array_equal(new[0]["U"], p2[0]["U"])  # no weight decay on frozen bases either
    np.testing.assert_array_equal(new[0]["V"], p2[0]["V"])
    assert float(jnp.abs(new[0]["S"] - p2[0]["S"]).max()) > 0
    assert float(jnp.abs(new[0]["bias"] - p2[0]["bias"]).max()) > 0  # the reference froze converted biases


def test_freeze_factors_is_transparent_on_dense_models():
    _fn, params = mlp_chain()
    tx = optax.adam(1e-3)
    wrapped = lowrank.freeze_factors(tx)
    assert jax.tree.structure(wrapped.init(params)) == jax.tree.structure(tx.init(params))


# -- errors -------------------------------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    w = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"rank: must be an integer in \[1, min\(m, n\) = 4\].*got 5"):
        lowrank.factorize(w, 5)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"cutoff: must be a number in the open interval \(0, 1\)"):
            lowrank.OIALRConfig(cutoff=bad)
    with pytest.raises(ValueError, match=r"delay: must be an integer >= 0.*-1"):
        lowrank.OIALRConfig(delay=-1)
    with pytest.raises(ValueError, match="stability_frequency: must be an integer >= 1"):
        lowrank.OIALRConfig(stability_frequency=0)
    fn, params = mlp_chain(widths=(24, 20, 3))
    with pytest.raises(ValueError, match=r"ranks: layer 0 \(24x20\) needs 1 <= rank <= size <= 20"):
        lowrank.factorize_chain(fn, params, ranks={"0": (21, 21)})
    with pytest.raises(ValueError, match="ranks: no eligible layer named"):
        lowrank.factorize_chain(fn, params, ranks={"7": (2, 2)})


def test_train_config_validation_names_the_lowrank_fields():
    from jaxalgo.config import RunConfig

    with pytest.raises(ValueError, match="lowrank_cutoff: must be a number in the open interval"):
        RunConfig.from_flags(lowrank="oialr", lowrank_cutoff=1.2)
    with pytest.raises(ValueError, match=r"lowrank_delay: must be an integer >= 0.*-5"):
        RunConfig.from_flags(lowrank="oialr", lowrank_delay=-5)
    with pytest.raises(ValueError, match="lowrank_frequency"):
        RunConfig.from_flags(lowrank="oialr", lowrank_frequency=0)
    with pytest.raises(ValueError, match="lowrank: unknown method 'svd'; allowed: none, oialr"):
        RunConfig.from_flags(lowrank="svd")


def test_storage_is_compacted_for_the_whole_model_when_padding_exceeds_the_ratio():
    layers = (lowrank.LayerInfo(0, (), 30, 20, 0), lowrank.LayerInfo(1, (), 20, 20, 0))
    sizes = {"0": 20, "1": 20}  # stored entries: 20 * 70 + 20 * 60 = 2600
    # live 12 * 62 + 20 * 60 = 1944: 2600 <= 1.5 * 1944, the padded arrays stay
    assert lowrank.storage_sizes(layers, {"0": 12, "1": 20}, sizes, 1.5) == sizes
    # live 5 * 55 + 14 * 54 = 1031: 2600 > 1.5 * 1031, every layer is compacted to its rank
    assert lowrank.storage_sizes(layers, {"0": 5, "1": 14}, sizes, 1.5) == {"0": 5, "1": 14}
    assert lowrank.storage_sizes(layers, {"0": 19, "1": 20}, sizes, 1.0) == {"0": 19, "1": 20}  # exact shapes
    # a staggered cut sequence (one layer per check): compactions, hence re-compilations, stay logarithmic
    many = tuple(lowrank.LayerInfo(i, (), 64, 64, 0) for i in range(12))
    ranks, sizes, shapes = {i.name: 64 for i in many}, {i.name: 64 for i in many}, 1
    for check in range(60):
        name = many[check % 12].name
        ranks[name] = max(2, ranks[name] * 3 // 4)
        new = lowrank.storage_sizes(many, ranks, sizes, 2.0)
        shapes += new != sizes
        sizes = new
    live = sum(r * (128 + r) for r in ranks.values())
    assert shapes <= 1 + math.log(12 * 64 * 192 / live) / math.log(2.0)


def test_compaction_moves_padded_layers_outside_the_window_exactly(x64):
    fn, params = mlp_chain(widths=(24, 20, 16, 4), dtype=jnp.float64)
    tx = optax.adam(1e-2)
    config = lowrank.OIALRConfig(cutoff=1e-6, window_growth=0.1, bucket_ratio=1.0)  # the window: the last layer
    _, p2, s2, layers, status = lowrank.convert(fn, params, tx.init(params), tx, config, ranks={"0": (5, 20)})
    assert [i.name for i in layers] == ["0", "2", "4"] and status.sizes["0"] == 20
    dense = lambda p: np.asarray(p[0]["U"]) @ np.asarray(p[0]["S"]) @ np.asarray(p[0]["V"]).T
    p3, s3, st3, report = lowrank.stability_check(p2, s2, tx, layers, status, config)
    assert list(report) == ["4"] and st3.sizes["0"] == st3.ranks["0"] == 5  # compacted although not checked
    assert p3[0]["S"].shape == (5, 5) and p3[0]["U"].shape == (24, 5)
    np.testing.assert_allclose(dense(p3), dense(p2), atol=1e-12)
    chex.assert_trees_all_equal_shapes(s3[0].mu, lowrank.trainable_part(p3))


# -- forward gradients on a factorised model ----------------------------------------------------------------------


@pytest.mark.parametrize("tangents", ["gaussian", "rank1"])
def test_frog_with_k_equal_to_the_trainable_count_is_exact_when_u_and_v_get_no_tangents(x64, tangents):
    from jaxalgo.grads import forward_gradient

    fn, params = mlp_chain((6, 8, 3), dtype=jnp.float64)
    fn2, p2, _ = lowrank.factorize_chain(fn, params, ranks={"0": (3, 3)})
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((16, 6))), "y": jnp.asarray(rng.standard_normal((16, 3)))}

    def loss_fn(p, b):
        return jnp.mean((fn2.apply(p, b["x"]) - b["y"]) ** 2)

    k = sum(x.size for x in jax.tree.leaves(lowrank.trainable_part(p2)))
    assert k < sum(x.size for x in jax.tree.leaves(p2))  # U and V are most of the numbers

    def build(f):
        return forward_gradient(f, num_tangents=k, aggregation="orthogonal_projection", tangents=tangents)

    exact = jax.grad(loss_fn)(p2, batch)  # zero at U and V (stop_gradient)
    estimator = lowrank.on_trainable_part(build, loss_fn)
    key = jax.random.key(1)
    loss, grads, _ = estimator.value_and_grad(p2, estimator.init(p2), batch, key=key)
    np.testing.assert_allclose(loss, loss_fn(p2, batch), rtol=1e-12)
    chex.assert_trees_all_close(grads, exact, rtol=1e-7, atol=1e-10)
    # with tangents on every leaf, the same k spans only part of the trainable directions
    everywhere = build(loss_fn)
    _, plain, _ = everywhere.value_and_grad(p2, everywhere.init(p2), batch, key=key)
    error = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(exact), strict=True)]
    assert max(error) > 1e-3
