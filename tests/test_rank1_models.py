"""Rank-1 tangents on jaxalgo's own models: no tangent is materialised, and d_i equals jax.jvp with a_i b_i^T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalgo import lowrank
from jaxalgo.grads import rank1_directional, rank1_fallbacks
from jaxalgo.grads._rank1_tangents import FactoredTangent, sample_tangents, tangent_keys
from jaxalgo.models import build_model, split_chain

pytestmark = pytest.mark.filterwarnings("ignore:.*nnx.State. will be deprecated:DeprecationWarning")

K = 3
INPUT_SHAPE = (4, 4, 2)
MODELS = {
    "mlp": {"hidden": (8, 6)},
    "resnet": {"channels": (2, 4)},  # stem, two residual blocks (the second strided, with a 1x1 projection), head
    "vit": {"patch_size": 2, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8},
}


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def model_problem(name):
    """The model's pure function, float64 parameters and a batch, built without XLA work (abstract init).

    ``"resnet-oialr"``: the resnet with every eligible layer factorised by OIALR at rank 2 (stored at size 3) where
    the layer allows, so its wider convolutions run in factored form and its frozen bases pass through
    ``stop_gradient``.
    """
    model = name.removesuffix("-oialr")
    make = lambda: build_model(model, input_shape=INPUT_SHAPE, num_outputs=3, key=jax.random.key(0), **MODELS[model])
    fn, abstract = split_chain(nnx.eval_shape(make))
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(abstract)
    params = jax.tree.unflatten(treedef, [jnp.asarray(0.5 * rng.standard_normal(x.shape)) for x in leaves])
    if name.endswith("-oialr"):
        ranks = {
            info.name: (min(2, info.full_rank), min(3, info.full_rank)) for info in lowrank.find_layers(fn, params)
        }
        fn, params, _ = lowrank.factorize_chain(fn, params, ranks=ranks)
    batch = {"x": jnp.asarray(rng.standard_normal((5, *INPUT_SHAPE))), "y": jnp.asarray(np.arange(5) % 3)}

    def loss_fn(params, batch):
        logits = fn(params, batch["x"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))

    return loss_fn, params, batch


@pytest.mark.parametrize("name", [*MODELS, "resnet-oialr"])
def test_rank1_directional_derivatives_equal_jvp_on_the_library_models(name):
    loss_fn, params, batch = model_problem(name)
    assert rank1_fallbacks(loss_fn, params, batch) == []  # every weight tangent stays factored all the way
    parts = rank1_directional(loss_fn, num_tangents=K)

    @jax.jit
    def both(params, batch, key):
        loss, d = parts.directional_derivatives(params, batch, key=key)
        leaves, treedef = jax.tree.flatten(params)
        tangents = sample_tangents(tangent_keys(key, K), leaves)  # the same draw as the estimator's
        dense = [t.materialize() if isinstance(t, FactoredTangent) else t for t in tangents]
        one = lambda i: jax.jvp(lambda p: loss_fn(p, batch), (params,), (treedef.unflatten([t[i] for t in dense]),))
        ref_loss, ref_d = jax.vmap(one)(jnp.arange(K))
        rank1_weights = sum(isinstance(t, FactoredTangent) for t in tangents)
        return loss, d, ref_loss[0], ref_d, rank1_weights

    loss, d, ref_loss, ref_d, rank1_weights = both(params, batch, jax.random.key(1))
    assert rank1_weights >= 3  # the weights (dense, conv, attention kernels) do get rank-1 tangents
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(d, ref_d, rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(np.asarray(ref_d)) > 1e-6)  # a non-trivial comparison
