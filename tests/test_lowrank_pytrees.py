"""Frozen factors on the parameter trees users actually have: nnx.State, linen dicts, masked dicts, equinox.

The chain's own plain-dict parameters are covered by tests/test_lowrank*.py; here the same guarantees --
AdamW's weight decay leaves ``U`` and ``V`` bit-identical while ``S`` and the bias move, and FROG with ``k`` equal
to the trainable count returns the exact gradient on the trainable leaves and exactly zero on the frozen ones --
are checked on trees that carry no S/U/V dict convention, or carry it inside ``nnx.State``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalgo import lowrank, models
from jaxalgo.grads import forward_gradient
from jaxalgo.lowrank._layers import FrozenFactor
from jaxalgo.lowrank._optim import trainable_mask

STEPS = 20


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _data(m=6, n=2, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, m))), jnp.asarray(rng.standard_normal((batch, n)))


def _factors(m=6, h=5, r=3, seed=1):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((h, r)))[0]
    s = rng.standard_normal((r, r))
    return lowrank.Factors(jnp.asarray(u), jnp.asarray(s), jnp.asarray(v)), jnp.asarray(rng.standard_normal(h))


class Net(nnx.Module):
    """A user's own model: a factorised layer, tanh, a dense head (6 parameter arrays, 2 of them frozen)."""

    def __init__(self, *, freeze_bases=True):
        factors, bias = _factors()
        self.low = lowrank.LowRankDense(factors, bias, in_shape=(6,), out_shape=(5,), freeze_bases=freeze_bases)
        self.head = nnx.Linear(5, 2, param_dtype=factors.S.dtype, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.head(jnp.tanh(self.low(x)))


def _adamw_steps(tx, params, loss):
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(STEPS):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    return params


def _adamw():
    return optax.adamw(1e-2, weight_decay=0.1)


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def _frog(loss, k, **kwargs):
    build = lambda f: forward_gradient(f, num_tangents=k, aggregation="orthogonal_projection")
    return lowrank.on_trainable_part(build, loss, **kwargs)


def _check_frog(estimator, params, batch, loss, frozen_leaves):
    """Exact gradient on the trainable leaves, exactly zero on ``frozen_leaves`` (a function of the tree)."""
    exact = jax.grad(loss)(params, batch)
    value, grads, _ = estimator.value_and_grad(params, estimator.init(params), batch, key=jax.random.key(3))
    np.testing.assert_allclose(value, loss(params, batch), rtol=1e-12)
    chex.assert_trees_all_equal_structs(grads, params)
    for g in frozen_leaves(grads):
        np.testing.assert_array_equal(g, np.zeros_like(g))
    frozen_ids = {id(g) for g in frozen_leaves(grads)}
    trainable = [(g, e) for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact), strict=True)]
    trainable = [(g, e) for g, e in trainable if id(g) not in frozen_ids]
    assert len(trainable) == len(jax.tree.leaves(params)) - len(frozen_ids) > 0
    for g, e in trainable:
        np.testing.assert_allclose(g, e, rtol=1e-7, atol=1e-10)


# -- nnx.State from nnx.split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("filters", [(), (nnx.Param,)], ids=["split", "split-param"])
def test_nnx_state_adamw_leaves_frozen_factors_bit_identical(x64, filters):
    model = Net()
    graphdef, params, *_ = nnx.split(model, *filters, ...) if filters else nnx.split(model)
    assert isinstance(params, nnx.State) and isinstance(params["low"]["U"], FrozenFactor)
    x, y = _data()
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    new = _adamw_steps(lowrank.freeze_factors(_adamw()), params, loss)
    np.testing.assert_array_equal(new["low"]["U"][...], params["low"]["U"][...])
    np.testing.assert_array_equal(new["low"]["V"][...], params["low"]["V"][...])
    assert len(jax.tree.leaves(lowrank.trainable_part(params))) == 4  # S, bias, head kernel and bias
    assert float(jnp.abs(new["low"]["S"][...] - params["low"]["S"][...]).max()) > 1e-3
    assert float(jnp.abs(new["low"]["bias"][...] - params["low"]["bias"][...]).max()) > 1e-3
    assert float(jnp.abs(new["head"]["kernel"][...] - params["head"]["kernel"][...]).max()) > 1e-3


def test_without_freezing_weight_decay_moves_the_bases(x64):
    """The failure mode freeze_factors prevents: the same loop with plain AdamW moves U (stop_gradient or not)."""
    model = Net()
    graphdef, params = nnx.split(model)
    x, y = _data()
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    new = _adamw_steps(_adamw(), params, loss)
    assert float(jnp.abs(new["low"]["U"][...] - params["low"]["U"][...]).max()) > 1e-3


def test_nnx_optimizer_keeps_frozen_factors(x64):
    """nnx.Optimizer hands the optimizer pure arrays in ``update`` (no Variable types): still frozen."""
    model = Net()
    u0, v0, s0 = model.low.U[...], model.low.V[...], model.low.S[...]
    optimizer = nnx.Optimizer(model, lowrank.freeze_factors(_adamw()), wrt=nnx.Param)
    x, y = _data()
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    for _ in range(3):
        optimizer.update(model, nnx.grad(loss)(model))
    np.testing.assert_array_equal(model.low.U[...], u0)
    np.testing.assert_array_equal(model.low.V[...], v0)
    assert float(jnp.abs(model.low.S[...] - s0).max()) > 1e-3


@pytest.mark.parametrize("freeze_bases", [True, False])
def test_nnx_optimizer_with_a_mask_from_the_typed_state(x64, freeze_bases):
    """A mask made from the typed state fits the pure arrays nnx.Optimizer passes, and follows the types."""
    model = Net(freeze_bases=freeze_bases)
    u0 = model.low.U[...]
    mask = trainable_mask(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, lowrank.freeze_factors(_adamw(), mask=mask), wrt=nnx.Param)
    x, y = _data()
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model))
    moved = float(jnp.abs(model.low.U[...] - u0).max())
    assert moved == 0.0 if freeze_bases else moved > 1e-3


def test_nnx_state_frog_is_exact_on_the_trainable_part_and_zero_on_the_bases(x64):
    model = Net()
    graphdef, params = nnx.split(model)
    x, y = _data()
    loss = lambda p, b: jnp.mean((nnx.merge(graphdef, p)(b[0]) - b[1]) ** 2)
    k = 3 * 3 + 5 + 5 * 2 + 2  # S, bias, head kernel and bias
    assert k < _count(params)
    _check_frog(_frog(loss, k), params, (x, y), loss, lambda g: [g["low"]["U"][...], g["low"]["V"][...]])
    assert _count(lowrank.trainable_part(params)) == k


def test_trainable_bases_are_plain_params_and_train(x64):
    """``freeze_bases=False``: U and V are ordinary nnx.Param, so the type says they train."""
    model = Net(freeze_bases=False)
    graphdef, params = nnx.split(model)
    assert type(params["low"]["U"]) is nnx.Param
    x, y = _data()
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    new = _adamw_steps(lowrank.freeze_factors(_adamw()), params, loss)
    assert float(jnp.abs(new["low"]["U"][...] - params["low"]["U"][...]).max()) > 1e-3


def test_factorize_chain_types_the_bases_and_keeps_plain_dict_params():
    from jaxalgo.models import Chain, split_chain

    fn, params = split_chain(Chain([nnx.Linear(8, 6, rngs=nnx.Rngs(0))]))
    fn2, p2, _ = lowrank.factorize_chain(fn, params)
    assert type(p2[0]) is dict and all(type(p2[0][k]) is not FrozenFactor for k in p2[0])
    module = nnx.merge(fn2.graphdefs[0], nnx.State(p2[0]))
    assert isinstance(module.U, FrozenFactor) and isinstance(module.V, FrozenFactor)
    assert type(module.S) is nnx.Param
    assert nnx.to_pure_dict(nnx.split(module)[1]).keys() == p2[0].keys()


# -- flax linen -----------------------------------------------------------------------------------------------------


def _linen_model():
    import flax.linen as nn

    factors, bias = _factors()

    class LinenLowRank(nn.Module):
        @nn.compact
        def __call__(self, x):
            u = jax.lax.stop_gradient(self.param("U", lambda _k: factors.U))
            v = jax.lax.stop_gradient(self.param("V", lambda _k: factors.V))
            s = self.param("S", lambda _k: factors.S)
            b = self.param("bias", lambda _k: bias)
            h = jnp.tanh(x @ u @ s @ v.T + b)
            return nn.Dense(2, param_dtype=factors.S.dtype)(h)

    return LinenLowRank()


def test_linen_dict_adamw_and_frog(x64):
    model = _linen_model()
    x, y = _data()
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    loss = lambda p, b: jnp.mean((model.apply(p, b[0]) - b[1]) ** 2)
    mask = trainable_mask(variables)
    assert mask["params"]["U"] is False and mask["params"]["S"] is True
    new = _adamw_steps(lowrank.freeze_factors(_adamw()), variables, lambda p: loss(p, (x, y)))
    np.testing.assert_array_equal(new["params"]["U"], variables["params"]["U"])
    np.testing.assert_array_equal(new["params"]["V"], variables["params"]["V"])
    assert float(jnp.abs(new["params"]["S"] - variables["params"]["S"]).max()) > 1e-3
    assert float(jnp.abs(new["params"]["bias"] - variables["params"]["bias"]).max()) > 1e-3
    k = _count(lowrank.trainable_part(variables))
    frozen = lambda g: [g["params"]["U"], g["params"]["V"]]
    _check_frog(_frog(loss, k), variables, (x, y), loss, frozen)


# -- plain dicts with an explicit mask ------------------------------------------------------------------------------


def _named_problem():
    """A dict without the S/U/V convention: ``left`` and ``right`` are to stay fixed (no stop_gradient)."""
    (u, s, v), bias = _factors()
    params = {"layer": {"left": u, "core": s, "right": v, "b": bias}, "out": jnp.ones((5, 2)) / 5}

    def loss(p, b):
        h = jnp.tanh(b[0] @ p["layer"]["left"] @ p["layer"]["core"] @ p["layer"]["right"].T + p["layer"]["b"])
        return jnp.mean((h @ p["out"] - b[1]) ** 2)

    mask = {"layer": {"left": False, "core": True, "right": False, "b": True}, "out": True}
    return params, loss, mask


@pytest.mark.parametrize("kind", ["tree", "callable"])
def test_plain_dict_with_an_explicit_mask(x64, kind):
    params, loss, mask = _named_problem()
    if kind == "callable":
        mask = lambda p: {"layer": {name: name not in ("left", "right") for name in p["layer"]}, "out": True}
    x, y = _data()
    assert _count(lowrank.trainable_part(params)) == _count(params)  # nothing to recognise without the mask
    new = _adamw_steps(lowrank.freeze_factors(_adamw(), mask=mask), params, lambda p: loss(p, (x, y)))
    np.testing.assert_array_equal(new["layer"]["left"], params["layer"]["left"])
    np.testing.assert_array_equal(new["layer"]["right"], params["layer"]["right"])
    assert float(jnp.abs(new["layer"]["core"] - params["layer"]["core"]).max()) > 1e-3
    assert float(jnp.abs(new["out"] - params["out"]).max()) > 1e-3
    part = lowrank.trainable_part(params, mask)
    assert set(part["layer"]) == {"core", "b"}
    k = _count(part)
    frozen = lambda g: [g["layer"]["left"], g["layer"]["right"]]
    _check_frog(_frog(loss, k, mask=mask), params, (x, y), loss, frozen)


def test_masked_state_is_the_inner_state_on_the_trainable_part():
    params, _loss, mask = _named_problem()
    tx = optax.adam(1e-3)
    state = lowrank.freeze_factors(tx, mask=mask).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(lowrank.trainable_part(params, mask)))
    chex.assert_trees_all_equal_shapes(
        state[0].mu, {"layer": {"core": params["layer"]["core"], "b": params["layer"]["b"]}, "out": params["out"]}
    )


def test_chain_params_default_mask_matches_the_dict_convention():
    from jaxalgo.models import Chain, split_chain

    fn, params = split_chain(Chain([nnx.Linear(8, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 3, rngs=nnx.Rngs(1))]))
    _, p2, _ = lowrank.factorize_chain(fn, params)
    mask = trainable_mask(p2)
    assert [mask[i]["U"] for i in range(2)] == [False, False] and mask[0]["S"] and mask[0]["bias"]
    tx = optax.adam(1e-3)
    default, explicit = lowrank.freeze_factors(tx).init(p2), lowrank.freeze_factors(tx, mask=mask).init(p2)
    assert jax.tree.structure(default) == jax.tree.structure(explicit)
    assert set(lowrank.trainable_part(p2)[0]) == {"S", "bias"}


# -- equinox --------------------------------------------------------------------------------------------------------


def test_equinox_partition_with_a_mask(x64):
    eqx = pytest.importorskip("equinox")
    factors, bias = _factors()

    class EqxNet(eqx.Module):
        U: jax.Array
        S: jax.Array
        V: jax.Array
        bias: jax.Array
        head: eqx.nn.Linear

        def __call__(self, x):
            u, v = jax.lax.stop_gradient(self.U), jax.lax.stop_gradient(self.V)
            return jax.vmap(self.head)(jnp.tanh(x @ u @ self.S @ v.T + self.bias))

    net = EqxNet(*factors, bias, eqx.nn.Linear(5, 2, key=jax.random.key(0), dtype=factors.S.dtype))
    params, static = eqx.partition(net, eqx.is_array)
    x, y = _data()
    loss = lambda p, b: jnp.mean((eqx.combine(p, static)(b[0]) - b[1]) ** 2)
    mask = eqx.tree_at(lambda m: (m.U, m.V), jax.tree.map(lambda _: True, params), (False, False))
    new = _adamw_steps(lowrank.freeze_factors(_adamw(), mask=mask), params, lambda p: loss(p, (x, y)))
    np.testing.assert_array_equal(new.U, params.U)
    np.testing.assert_array_equal(new.V, params.V)
    assert float(jnp.abs(new.S - params.S).max()) > 1e-3
    assert float(jnp.abs(new.bias - params.bias).max()) > 1e-3
    k = _count(lowrank.trainable_part(params, mask))
    assert k == 3 * 3 + 5 + 5 * 2 + 2
    _check_frog(_frog(loss, k, mask=mask), params, (x, y), loss, lambda g: [g.U, g.V])


# -- errors ---------------------------------------------------------------------------------------------------------


def test_a_mask_with_the_wrong_structure_names_mask():
    params, loss, mask = _named_problem()
    bad = {"layer": {"left": False, "core": True}, "out": True}  # keys missing
    with pytest.raises(ValueError, match="mask"):
        lowrank.trainable_part(params, bad)
    with pytest.raises(ValueError, match="mask"):
        lowrank.freeze_factors(optax.adam(1e-3), mask=bad).init(params)
    with pytest.raises(ValueError, match="mask"):
        _frog(loss, 3, mask=bad).init(params)
    with pytest.raises(ValueError, match="mask"):
        lowrank.freeze_factors(optax.adam(1e-3), mask=lambda p: [True]).init(params)
    with pytest.raises(ValueError, match=r"mask: leaves must be bools"):
        lowrank.trainable_part(params, jax.tree.map(lambda _: 1.0, mask))


def test_a_chain_of_plain_functions_is_refused_in_one_line_naming_what_works():
    """Plain block functions hide their layers: finding and factorising them fails with a TypeError that says
    which models work, not with an AttributeError from inside flax."""
    fn = models.chain_of([lambda p, h: h @ p["w"], lambda p, h: h @ p["w"]])
    params = [{"w": jnp.ones((4, 4))}, {"w": jnp.ones((4, 2))}]
    for call in (lowrank.find_layers, lowrank.factorize_chain):
        with pytest.raises(TypeError, match=r"^fn: low-rank training factorises .* got BlockFns") as error:
            call(fn, params)
        assert "\n" not in str(error.value)
