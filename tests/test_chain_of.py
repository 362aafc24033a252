"""Block-wise estimators on plain block functions (``jaxalgo.models.chain_of``), without a jaxalgo Chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxalgo
from jaxalgo import losses
from jaxalgo.grads import dfa, drtp, f3, fa, last_layer_only
from jaxalgo.models._chain import BlockFns, chain_of

N, D, C = 16, 6, 4
KEY = jax.random.key(7)


def _dense(p, h):
    return jnp.tanh(h @ p["w"] + p["b"])


def _head(p, h):
    return h @ p["w"] + p["b"]


def _problem():
    """The same tanh MLP as a jaxalgo Chain (tuple of nnx dicts) and as plain functions (list of plain dicts)."""
    model = jaxalgo.models.mlp((D,), C, hidden=(5, 3), activation="tanh", key=jax.random.key(0))
    fn, params = jaxalgo.models.split_chain(model)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    plain = [{"w": p["linear"]["kernel"], "b": p["linear"]["bias"]} for p in params]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, C, size=N).astype(np.int32)
    idx = np.asarray([3, 1, 4, 15, 9, 2], np.int32)
    return fn, params, plain, {"x": x[idx], "y": y[idx], "idx": idx}, y


def _as_plain(grads):
    return [{"w": g["linear"]["kernel"], "b": g["linear"]["bias"]} for g in grads]


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14), a, b)


def test_chain_of_applies_the_blocks_in_order():
    with jax.enable_x64(True):
        fn, params, plain, batch, _ = _problem()
        blocks = chain_of([_dense, _dense, _head])
        assert isinstance(blocks, BlockFns) and blocks.num_blocks == 3
        _close(blocks.apply(plain, batch["x"]), fn.apply(params, batch["x"]))
        _close(blocks(tuple(plain), batch["x"]), fn(params, batch["x"]))
        _close(blocks.block_outputs(plain, batch["x"]), fn.block_outputs(params, batch["x"]))
        _close(blocks.apply_block(2, plain[2], batch["x"][:, :3]), _head(plain[2], batch["x"][:, :3]))
        with pytest.raises(
            ValueError, match=r"params: expected a list or tuple with one pytree per block \(3\), got 2"
        ):
            blocks.apply(plain[:2], batch["x"])


@pytest.mark.parametrize("mode", ["per_block", "surrogate"])
def test_block_functions_give_the_updates_of_the_same_chain(mode):
    with jax.enable_x64(True):
        fn, params, plain, batch, y = _problem()
        builders = {
            "f3": lambda c: f3(c, losses.sigmoid_bce, input_shape=(D,), train_targets=y, mode=mode, key=KEY),
            "dfa": lambda c: dfa(c, losses.sigmoid_bce, input_shape=(D,), mode=mode, key=KEY),
            "drtp": lambda c: drtp(c, losses.sigmoid_bce, input_shape=(D,), mode=mode, key=KEY),
            "llo": lambda c: last_layer_only(c, losses.sigmoid_bce, input_shape=(D,), mode=mode, key=KEY),
        }
        for name, build in builders.items():
            reference = build(fn)
            ref_state = reference.init(params)
            ref_loss, ref_grads, ref_new = reference.value_and_grad(params, ref_state, batch, key=KEY)
            # the list itself, or chain_of of it: the same estimator
            for chain in ([_dense, _dense, _head], chain_of((_dense, _dense, _head))):
                est = build(chain)
                state = est.init(plain)
                jax.tree.map(np.testing.assert_array_equal, state.feedback, ref_state.feedback)  # same key, same B
                step = jax.jit(lambda p, s, b, est=est: est.value_and_grad(p, s, b, key=KEY))
                loss, grads, new = step(plain, state, batch)
                assert isinstance(grads, list), name  # the container of params, so that optax adds them
                _close(loss, ref_loss)
                _close(grads, _as_plain(ref_grads))
                _close(new, ref_new)
            updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(plain))
            assert isinstance(optax.apply_updates(plain, updates), list)


def test_what_is_not_a_chain_says_how_to_make_one():
    with jax.enable_x64(True):
        _, _, plain, _, y = _problem()
    model = jaxalgo.models.mlp((D,), C, hidden=(5,), key=jax.random.key(0))
    block = nnx.Linear(D, C, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"chain: f3 takes the pure function of a Chain: .*split_chain\(model\)"):
        f3(model, losses.sigmoid_bce, input_shape=(D,), train_targets=y, key=KEY)
    with pytest.raises(
        TypeError, match=r"flax module \(Linear\) that is not a jaxalgo.models.Chain.*split_chain.*chain_of"
    ):
        dfa(block, losses.sigmoid_bce, input_shape=(D,), key=KEY)
    with pytest.raises(TypeError, match=r"got a single function; make one with .*chain_of\(\[block0, ..., head\]\)"):
        drtp(_head, losses.sigmoid_bce, input_shape=(D,), key=KEY)
    with pytest.raises(TypeError, match=r"chain: blocks\[1\]: a Linear module holds its own parameters"):
        dfa([_dense, block], losses.sigmoid_bce, input_shape=(D,), key=KEY)
    with pytest.raises(ValueError, match=r"chain: blocks: got an empty sequence"):
        dfa([], losses.sigmoid_bce, input_shape=(D,), key=KEY)
    with pytest.raises(TypeError, match=r"blocks: expected a list or tuple of block functions"):
        chain_of(model)
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected a function"):
        chain_of([3])
    est = dfa([_dense, _dense, _head], losses.sigmoid_bce, input_shape=(D,), key=KEY)
    with pytest.raises(TypeError, match=r"params: expected a list or tuple with one pytree per block, got dict"):
        est.init(dict(enumerate(plain)))
    # feedback alignment needs the dense layers themselves
    for chain in ([_dense, _head], chain_of([_dense, _head])):
        with pytest.raises(TypeError, match=r"feedback alignment .* DenseBlock.* train them with dfa, drtp or f3"):
            fa(chain, losses.sigmoid_bce, key=KEY)
    with pytest.raises(TypeError, match=r"fa takes the pure function of a Chain of the blocks: .*Chain\(blocks\)"):
        fa([block, block], losses.sigmoid_bce, key=KEY)
    with pytest.raises(TypeError, match=r"chain: fa takes the pure function of the Chain: fn, params = .*split_chain"):
        fa(model, losses.sigmoid_bce, key=KEY)
    with pytest.raises(
        TypeError, match=r"needs the pure function of a chain of DenseBlocks, got a flax module \(Linear\)"
    ):
        fa(block, losses.sigmoid_bce, key=KEY)
