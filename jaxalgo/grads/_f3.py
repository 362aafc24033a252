r"""F3 (feed-forward with delayed feedback), DFA, DRTP and last-layer-only training on chains of blocks.

The model is a chain of blocks :math:`h_l = f_l(\theta_l, h_{l-1})`, :math:`h_0 = x`, whose last block outputs
:math:`z` (logits or regression outputs, width :math:`C`). Between hidden block :math:`l` and the rest sits a
fixed random feedback matrix :math:`B_l` of shape :math:`(C, n_l)`, :math:`n_l` the flattened width of
:math:`h_l`. Instead of the true incoming gradient, hidden block :math:`l` receives

.. math:: \frac{\partial L}{\partial h_l} := s \, e B_l, \qquad s = 1 \text{ (sum over the batch) or } 1/B
   \text{ (mean)},

and ordinary autodiff runs inside the block: :math:`\Delta\theta_l = (\partial h_l / \partial \theta_l)^\top
s\, e B_l`; for a dense block :math:`h_l = \tanh(h_{l-1} W_l + b_l)` this is
:math:`h_{l-1}^\top [(s\, e B_l) \odot \tanh'(a_l)]`. The last block gets the true gradient of the loss (a mean
over the batch) with its input held fixed. The error signal :math:`e` (``B x C``) names the method:

- DFA (Nøkland 2016): the current error :math:`e = t - y`, with :math:`y = \sigma(z)` the output after the
  loss's output nonlinearity (sigmoid for sigmoid + BCE, softmax for softmax cross-entropy, identity for MSE)
  and :math:`t` the one-hot (classification) or real (regression) target;
- DRTP (Frenkel et al. 2021): the target, :math:`e = t`;
- F3 (Flügel et al.): the error of the same sample from its previous visit, read from a buffer of shape
  ``[N_train, C]`` that is initialised to the targets (so the first epoch is DRTP) and whose row ``i`` becomes
  :math:`t_i - y_i` of the forward pass in which sample ``i`` is visited (``.at[idx].set``);
- last layer only: :math:`e = 0` (hidden blocks keep their initial weights).

The sign follows the reference implementation: the pseudo-gradient is :math:`+e B_l` (the optimizer subtracts it).

F3's error variants (:data:`F3_VARIANTS`), ``t`` the target, ``r_i`` the stored row of sample ``i``:

- ``delayed_error``: stores :math:`t - y`; uses :math:`e = r_i`.
- ``delayed_loss``: stores :math:`-\partial \ell_i / \partial z_i`, the negative gradient of the sample's loss
  with respect to the model output, by autodiff of the output loss; uses :math:`e = r_i`. For jaxalgo's losses,
  which take logits (sigmoid + BCE, softmax + cross-entropy, identity + MSE), this equals ``delayed_error``; it
  differs for any other output loss.
- ``*_one_hot``: stores the same as the form without the suffix; uses :math:`e = t \odot r_i` (the error of the
  true class only). Classification only.
- ``*_softmax``: stores :math:`t - \mathrm{softmax}(z)` (``delayed_error_softmax``) or the negative gradient of
  the softmax cross-entropy (``delayed_loss_softmax``; the same vector for one-hot targets), whatever the output
  loss. Classification only. (The reference applies softmax to its sigmoid outputs; here it acts on the logits.)
- ``current_error`` (= DFA), ``one_hot_target`` (= DRTP), ``zeros`` (= last layer only): no buffer.

Two execution modes compute the same updates:

- ``"surrogate"``: the gradient of the plain pure function
  :math:`L(z) + \sum_l \langle h_l, \mathrm{sg}(s\, e B_l) \rangle` evaluated on a chain with
  :math:`\mathrm{sg}` (stop-gradient) between blocks. Composes with every JAX transformation.
- ``"per_block"``: block :math:`l`'s gradient is a ``jax.vjp`` applied right after its own forward; an
  data dependency makes the next block's forward wait for it, so the compiled step never holds more than
  one block's residuals (the reason F3 exists: no update locking, no stored activations). For DFA the current
  error needs the output first, so this mode runs one extra forward pass to get it (as the reference does).

The model is a :class:`jaxalgo.models.ChainFn` (``split_chain`` of a :class:`jaxalgo.models.Chain`), or any
list of plain block functions ``block(params_l, h) -> h`` with ``params`` a list or tuple of per-block pytrees
(wrapped by :func:`jaxalgo.models.chain_of`).

Sample indices out of range. The buffer row of sample ``i`` is read and written at ``batch["idx"]``. With
concrete indices (eager calls) an index outside ``[0, N)`` raises a ValueError. Under ``jax.jit`` the indices
are unknown while tracing and an XLA gather would silently clamp them (and a negative index would wrap), so the
step instead makes such a batch unusable, on every backend and with nothing for the caller to wrap: the read
fills NaN rows (``mode="fill"``), so the returned loss is NaN and so is every hidden block's gradient (in the
per-block mode every gradient), and the write drops the index (``mode="drop"``) instead of writing a clamped or
wrapped row. A training loop that checks the loss (``jaxalgo.train`` does) stops; ``optax.apply_if_finite``
skips the update. Host callbacks (``jax.debug.callback``) would leave the device every step and
``jax.experimental.checkify`` only reports when the caller wraps the step, so neither guarantees the error.

References:
  Flügel, Coquelin, Weiel, Debus, Streit, Götz, *Feed-Forward Optimization With Delayed Feedback for Neural
  Networks*, ICONIP 2024 (arXiv 2304.13372).
  Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*, NeurIPS 2016.
  Frenkel, Lefebvre, Bol, *Learning Without Feedback: Fixed Random Learning Signals Allow for Feedforward
  Training of Deep Neural Networks*, Frontiers in Neuroscience 2021.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalgo import losses as _losses
from jaxalgo.grads._estimator import Estimator, Problem, check_float_params, check_scalar_loss
from jaxalgo.grads._feedback import FeedbackInit, check_feedback_init, feedback_matrices
from jaxalgo.models._chain import Chain, chain_of
from jaxalgo.options import check_fields, option

F3Variant = Literal[
    "delayed_error",
    "delayed_loss",
    "delayed_error_one_hot",
    "delayed_loss_one_hot",
    "delayed_error_softmax",
    "delayed_loss_softmax",
    "current_error",
    "one_hot_target",
    "zeros",
]
F3_VARIANTS: tuple[F3Variant, ...] = typing.get_args(F3Variant)
DELAYED_VARIANTS: tuple[F3Variant, ...] = tuple(v for v in F3_VARIANTS if v.startswith("delayed"))
FeedbackMode = Literal["per_block", "surrogate"]
"""How a feedback estimator computes its updates: block by block, or from one surrogate objective (the same)."""
MODES: tuple[FeedbackMode, ...] = typing.get_args(FeedbackMode)
HiddenReduction = Literal["sum", "mean"]
"""How a hidden block's update reduces over the batch."""
HIDDEN_REDUCTIONS: tuple[HiddenReduction, ...] = typing.get_args(HiddenReduction)
OutputActivation = Literal["sigmoid", "softmax", "identity"]
"""The output nonlinearity ``y = act(z)`` in the error ``t - y`` that is fed back."""
OUTPUT_ACTIVATION_NAMES: tuple[OutputActivation, ...] = typing.get_args(OutputActivation)
OUTPUT_ACTIVATIONS: dict[OutputActivation, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": jax.nn.softmax,
    "identity": lambda z: z,
}
assert tuple(OUTPUT_ACTIVATIONS) == OUTPUT_ACTIVATION_NAMES
LOSS_ACTIVATIONS: dict[_losses.LossName, OutputActivation] = {
    "sigmoid_bce": "sigmoid",
    "cross_entropy": "softmax",
    "mse": "identity",
}
"""The output nonlinearity of the error ``t - y`` for each of :data:`jaxalgo.losses.LOSSES`: the one its loss
applies to the model output."""
_KNOWN_LOSS_ACTIVATIONS = {_losses.get_loss(name): activation for name, activation in LOSS_ACTIVATIONS.items()}
FEEDBACK_PRESETS: dict[str, dict[str, F3Variant]] = {
    "f3": {},
    "dfa": {"variant": "current_error"},
    "drtp": {"variant": "one_hot_target"},
    "llo": {"variant": "zeros"},
}
"""The named feedback methods as :class:`FeedbackOptions` presets: the fields each name pins."""


class FeedbackState(NamedTuple):
    """State of DFA, DRTP, last-layer-only and FA: the fixed feedback matrices (never trained)."""

    feedback: tuple[jax.Array, ...]


class DelayedFeedbackState(NamedTuple):
    """State of F3: the fixed feedback matrices and the delayed error buffer ``errors`` of shape ``[N, C]``."""

    feedback: tuple[jax.Array, ...]
    errors: jax.Array


_Choice = TypeVar("_Choice", bound=str)


def _check_choice(name: str, value: _Choice, allowed: Sequence[str]) -> _Choice:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(allowed)}")
    return value


def method_name(variant: F3Variant) -> str:
    """The name of the method a variant is (:data:`FEEDBACK_PRESETS`): dfa, drtp, llo, else f3."""
    return next((name for name, fixed in FEEDBACK_PRESETS.items() if fixed.get("variant") == variant), "f3")


def loss_activation(loss_name: _losses.LossName | None) -> OutputActivation | None:
    """The output nonlinearity for the loss called ``loss_name`` (:data:`LOSS_ACTIVATIONS`); None for None."""
    if loss_name is None:
        return None
    return LOSS_ACTIVATIONS[_check_choice("loss_name", loss_name, tuple(LOSS_ACTIVATIONS))]


def resolve_output_activation(output_loss: Callable, output_activation: OutputActivation | None) -> OutputActivation:
    """The output nonlinearity ``y = act(z)`` whose error ``t - y`` feeds back; inferred for jaxalgo's losses."""
    if output_activation is None:
        if output_loss not in _KNOWN_LOSS_ACTIVATIONS:
            raise ValueError(
                "output_activation: got None with a custom output_loss; pass one of "
                f"{', '.join(OUTPUT_ACTIVATIONS)} (the nonlinearity your loss applies to the model output)"
            )
        return _KNOWN_LOSS_ACTIVATIONS[output_loss]
    return _check_choice("output_activation", output_activation, OUTPUT_ACTIVATION_NAMES)


_HOW_TO_CHAIN = (
    "jaxalgo.models.split_chain(jaxalgo.models.Chain([block0, ..., head]))[0] for flax blocks, or "
    "jaxalgo.models.chain_of([block0, ..., head]) for functions block(params_l, h) -> h"
)


def _chain_type_error(chain: Any, *, by: str) -> TypeError:
    """The error for a ``chain`` argument that is not a chain of blocks, saying how to make one."""
    if isinstance(chain, Chain):
        return TypeError(
            f"chain: {by} takes the pure function of a Chain: fn, params = jaxalgo.models.split_chain(model)"
        )
    if isinstance(chain, nnx.Module):
        what = f"a flax module ({type(chain).__name__}) that is not a jaxalgo.models.Chain"
    elif callable(chain):
        what = "a single function"
    else:
        what = f"a {type(chain).__name__}"
    return TypeError(f"chain: {by} needs the model as a chain of blocks, got {what}; make one with {_HOW_TO_CHAIN}")


def as_chain(chain: Any, *, by: str = "f3") -> Any:
    """``chain`` if it is a chain of blocks (``num_blocks``, ``apply_block``, ``apply``, ``block_outputs``), a
    list or tuple of block functions wrapped by :func:`jaxalgo.models.chain_of`, else a TypeError saying how."""
    if all(hasattr(chain, name) for name in ("num_blocks", "apply_block", "apply", "block_outputs")):
        return chain
    if isinstance(chain, list | tuple):
        try:
            return chain_of(chain)
        except (TypeError, ValueError) as error:
            raise type(error)(f"chain: {error}") from None
    raise _chain_type_error(chain, by=by)


def block_output_shapes(chain: Any, input_shape: Sequence[int], params: Any) -> list[tuple[int, ...]]:
    """The per-example output shape of every block (abstract evaluation, no FLOPs)."""
    x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32)
    outs = jax.eval_shape(chain.block_outputs, params, x)
    return [tuple(o.shape[1:]) for o in outs]


def encode_targets(y: jax.Array, num_outputs: int, dtype) -> jax.Array:
    """Targets as ``(B, C)``: one-hot rows for integer labels, the values themselves for real targets."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, num_outputs, dtype=dtype)
    if y.ndim != 2 or y.shape[1] != num_outputs:
        raise ValueError(f"batch['y']: real targets must have shape (B, {num_outputs}), got {y.shape}")
    return y.astype(dtype)


# -- the choices of one estimator -----------------------------------------------------------------------------


class _Spec(NamedTuple):
    """The checked choices of one feedback estimator (everything but the key and the feedback init)."""

    chain: Any
    output_loss: Callable[[jax.Array, jax.Array], jax.Array]
    variant: F3Variant
    activation: OutputActivation
    mode: FeedbackMode
    hidden_reduction: HiddenReduction
    targets: np.ndarray | None  # the training targets of a delayed variant (its buffer's rows), else None

    @property
    def delayed(self) -> bool:
        return self.variant in DELAYED_VARIANTS

    @property
    def act(self) -> Callable[[jax.Array], jax.Array]:
        return OUTPUT_ACTIVATIONS[self.activation]


def _make_spec(chain, output_loss, *, variant, output_activation, train_targets, mode, hidden_reduction) -> _Spec:
    variant = _check_choice("variant", variant, F3_VARIANTS)
    chain = as_chain(chain, by=method_name(variant))
    if not callable(output_loss):
        raise TypeError(f"output_loss: expected a callable, got {type(output_loss).__name__}")
    mode = _check_choice("mode", mode, MODES)
    hidden_reduction = _check_choice("hidden_reduction", hidden_reduction, HIDDEN_REDUCTIONS)
    activation = resolve_output_activation(output_loss, output_activation)
    if (variant.endswith("_one_hot") or variant.endswith("_softmax")) and activation == "identity":
        raise ValueError(
            f"variant: {variant!r} needs class targets; with identity outputs (regression) use "
            "delayed_error or delayed_loss"
        )
    targets = None
    if variant in DELAYED_VARIANTS:
        if train_targets is None:
            raise ValueError(f"train_targets: variant {variant!r} needs the training targets to initialise its buffer")
        targets = np.asarray(train_targets)
        if targets.ndim not in (1, 2) or len(targets) == 0:
            raise ValueError(f"train_targets: expected labels (N,) or targets (N, C) with N >= 1, got {targets.shape}")
    return _Spec(chain, output_loss, variant, activation, mode, hidden_reduction, targets)


# -- parameters, state and batch ------------------------------------------------------------------------------


def _check_params(chain: Any, params: Any) -> None:
    check_float_params(params)
    if not isinstance(params, list | tuple):
        raise TypeError(f"params: expected a list or tuple with one pytree per block, got {type(params).__name__}")
    if len(params) != chain.num_blocks:
        raise ValueError(f"params: got {len(params)} blocks, the chain has {chain.num_blocks}")


def _like(params: Any, grads: Sequence[Any]) -> Any:
    """``grads`` in the container of ``params`` (list or tuple), so that optax can add them."""
    return list(grads) if isinstance(params, list) else tuple(grads)


def _dtype(params: Any) -> Any:
    return jax.tree_util.tree_leaves(params[-1])[0].dtype


class _Setup(NamedTuple):
    """What every feedback estimator derives from the model before the first step."""

    num_outputs: int
    hidden_widths: tuple[int, ...]
    dtype: Any


def _model_setup(chain: Any, input_shape: Sequence[int], params: Any) -> _Setup:
    _check_params(chain, params)
    shapes = block_output_shapes(chain, input_shape, params)
    if len(shapes[-1]) != 1:
        raise ValueError(f"chain: the last block must output (B, C); its output per example is {shapes[-1]}")
    return _Setup(shapes[-1][0], tuple(math.prod(s) for s in shapes[:-1]), _dtype(params))


def _init_state(spec: _Spec, params, *, input_shape, feedback_init, key):
    setup = _model_setup(spec.chain, input_shape, params)
    shapes = [(setup.num_outputs, n) for n in setup.hidden_widths]
    feedback = feedback_matrices(key, shapes, feedback_init, setup.dtype)
    if not spec.delayed:
        return FeedbackState(feedback)
    targets = spec.targets
    if targets is None:
        raise ValueError("train_targets: a delayed variant starts its error buffer from them, got None")
    if targets.ndim == 2 and targets.shape[1] != setup.num_outputs:
        raise ValueError(f"train_targets: shape {targets.shape} does not match the model's {setup.num_outputs} outputs")
    if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        if targets.min() < 0 or targets.max() >= setup.num_outputs:
            raise ValueError(
                f"train_targets: labels must lie in [0, {setup.num_outputs}), got [{targets.min()}, {targets.max()}]"
            )
    errors = encode_targets(jnp.asarray(targets), setup.num_outputs, setup.dtype)
    return DelayedFeedbackState(feedback, errors)


def _check_state(spec: _Spec, state: Any) -> None:
    expected = DelayedFeedbackState if spec.delayed else FeedbackState
    if not isinstance(state, expected):
        raise TypeError(f"state: expected a {expected.__name__} from this estimator's init, got {type(state).__name__}")
    hidden = spec.chain.num_blocks - 1
    if len(state.feedback) != hidden:
        raise ValueError(f"state: holds {len(state.feedback)} feedback matrices, the chain has {hidden} hidden blocks")
    if not spec.delayed:
        return
    assert isinstance(state, DelayedFeedbackState) and spec.targets is not None  # checked above and by the spec
    if state.errors.shape[0] != len(spec.targets):
        raise ValueError(
            f"state.errors: the delayed error buffer has {state.errors.shape[0]} rows but the training "
            f"set has {len(spec.targets)} examples; build the estimator with this data set's train_targets"
        )


def _check_batch(batch: Any, *, num_train: int | None) -> None:
    """Checks the batch's keys; with ``num_train`` (a delayed variant) also ``batch["idx"]``, whose values must
    lie in ``[0, num_train)`` when they are concrete (under jit, see :func:`_buffer_index`)."""
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch: expected a dict with keys 'x' and 'y' (and 'idx' for F3's delayed error)")
    if num_train is None:
        return
    if "idx" not in batch:
        raise ValueError(
            "batch: F3's delayed error needs the samples' indices in the training split as batch['idx'] "
            "(jaxalgo.data.iterate_batches yields them); got keys " + ", ".join(sorted(batch))
        )
    idx = batch["idx"]
    if not jnp.issubdtype(jnp.result_type(idx), jnp.integer):
        raise ValueError(f"batch['idx']: must hold integer indices, got dtype {jnp.result_type(idx)}")
    if jnp.ndim(idx) != 1 or jnp.shape(idx)[0] != jnp.shape(batch["x"])[0]:
        raise ValueError(f"batch['idx']: expected shape ({jnp.shape(batch['x'])[0]},), got {jnp.shape(idx)}")
    idx_np = _concrete(idx)
    if idx_np is not None and idx_np.size and (idx_np.min() < 0 or idx_np.max() >= num_train):
        raise ValueError(f"batch['idx']: indices must lie in [0, {num_train}), got [{idx_np.min()}, {idx_np.max()}]")


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array, or None while tracing (values unknown)."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return None


# -- the delayed error buffer ---------------------------------------------------------------------------------


def _buffer_index(idx: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """``(safe, all_valid)``: ``idx`` with every index outside ``[0, num_rows)`` replaced by ``num_rows``
    (out of bounds for the gather's fill and the scatter's drop, never wrapped like a negative index), and
    whether every index was in range."""
    idx = jnp.asarray(idx)
    valid = (idx >= 0) & (idx < num_rows)
    return jnp.where(valid, idx, num_rows), jnp.all(valid)


def _read_buffer(errors: jax.Array, safe_idx: jax.Array) -> jax.Array:
    """The buffer rows at ``safe_idx``; NaN rows where it is out of range (never a clamped row)."""
    return errors.at[safe_idx].get(mode="fill", fill_value=jnp.nan)


def _write_buffer(errors: jax.Array, safe_idx: jax.Array, rows: jax.Array) -> jax.Array:
    """The buffer with rows ``safe_idx`` set to ``rows``; out-of-range indices write nothing."""
    return errors.at[safe_idx].set(rows.astype(errors.dtype), mode="drop")


def _nan_unless(ok: jax.Array, loss: jax.Array) -> jax.Array:
    """``loss`` if ``ok``, else NaN (a select: the value is exact when ``ok``).

    Only the loss is selected: the hidden blocks' gradients are NaN by themselves (the NaN rows reach every
    entry through ``e B_l``), and a select on every gradient leaf changes how XLA fuses the gradient kernels,
    which costs bit-for-bit agreement with DRTP in the first epoch.
    """
    return jnp.where(ok, loss, jnp.nan).astype(loss.dtype)


# -- the error signal -----------------------------------------------------------------------------------------


def _error_before_forward(spec: _Spec, rows: jax.Array | None, t: jax.Array) -> jax.Array | None:
    """``e`` when it does not depend on this step's forward pass (``rows``: the buffer's, delayed variants),
    else None (DFA)."""
    if spec.variant == "one_hot_target":
        return t
    if spec.variant == "zeros":
        return jnp.zeros_like(t)
    if spec.delayed:
        if rows is None:
            raise ValueError(f"rows: the delayed variant {spec.variant!r} reads its error buffer's rows, got None")
        return t * rows if spec.variant.endswith("_one_hot") else rows
    return None


def _current_error(spec: _Spec, z: jax.Array, t: jax.Array) -> jax.Array:
    return t - spec.act(jax.lax.stop_gradient(z))


def _stored_signal(spec: _Spec, z: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    """The vector a delayed variant stores for each sample (rows of ``B x C``), from this forward pass."""
    z = jax.lax.stop_gradient(z)
    kind = spec.variant.removesuffix("_one_hot")
    if kind == "delayed_error":
        return t - spec.act(z)
    if kind == "delayed_loss":
        return -z.shape[0] * jax.grad(lambda u: spec.output_loss(u, y))(z)
    if kind == "delayed_error_softmax":
        return t - jax.nn.softmax(z)
    # delayed_loss_softmax: minus the gradient of the softmax cross-entropy with targets t
    return -z.shape[0] * jax.grad(lambda u: -jnp.sum(t * jax.nn.log_softmax(u), axis=-1).mean())(z)


# -- the two execution modes ----------------------------------------------------------------------------------


def _head_loss(spec: _Spec, head_params, h, y):
    z = spec.chain.apply_block(spec.chain.num_blocks - 1, head_params, h)
    loss = spec.output_loss(z, y)
    check_scalar_loss(loss, has_aux=False)
    return loss, z


def _hidden_cotangent(spec: _Spec, e, matrix, h):
    """``s e B_l`` shaped like the block output ``h``: the product in the error's and feedback's dtype (float32
    under mixed precision, like the buffer), rounded once to ``h``'s dtype (the block's vjp wants it there)."""
    scale = 1.0 if spec.hidden_reduction == "sum" else 1.0 / e.shape[0]
    return (scale * (e @ matrix)).reshape(h.shape).astype(h.dtype)


def _after(done: Any, values: Any) -> Any:
    """``values`` unchanged, but computed only once ``done`` is: adds ``0 * (one element of done)``.

    This data dependency orders the per-block mode: block ``l + 1`` (its parameters and its error projection)
    waits for block ``l``'s gradient, so block ``l``'s activations are dead before block ``l + 1`` runs and the
    compiled step holds one block's activations whatever the depth. (``lax.optimization_barrier`` does not
    survive XLA's CPU pipeline. The cost: one elementwise add over the next block's parameters and the error.)
    """
    first = jax.tree_util.tree_leaves(done)[0]
    tie = 0.0 * first.reshape(-1)[0]
    return jax.tree.map(lambda v: v + tie.astype(v.dtype), values)


def _surrogate_step(spec: _Spec, params, feedback, batch, t, e):
    """Gradient of ``L(z) + sum_l <h_l, sg(s e B_l)>`` with stop-gradients between blocks."""
    chain = spec.chain

    def objective(params):
        hidden, h = [], batch["x"]
        for index in range(chain.num_blocks - 1):
            h = chain.apply_block(index, params[index], jax.lax.stop_gradient(h))
            hidden.append(h)
        loss, z = _head_loss(spec, params[-1], jax.lax.stop_gradient(h), batch["y"])
        signal = jax.lax.stop_gradient(_current_error(spec, z, t) if e is None else e)
        feedback_term = sum(
            (
                jnp.vdot(h_l, _hidden_cotangent(spec, signal, b_l, h_l))
                for h_l, b_l in zip(hidden, feedback, strict=True)
            ),
            start=jnp.zeros((), loss.dtype),
        )
        return loss + feedback_term, (loss, z)

    (_, (loss, z)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, z, grads


def _per_block_step(spec: _Spec, params, feedback, batch, t, e):
    """Each hidden block's ``jax.vjp`` right after its forward, the next block tied to its result."""
    chain = spec.chain
    if e is None:  # DFA: the current error needs the output before any block's update is known
        e = _current_error(spec, chain.apply(params, batch["x"]), t)
    grads, h, params = [], batch["x"], list(params)
    for index in range(chain.num_blocks - 1):
        out, block_vjp = jax.vjp(lambda p, i=index, h_in=h: chain.apply_block(i, p, h_in), params[index])
        (g,) = block_vjp(_hidden_cotangent(spec, e, feedback[index], out))
        grads.append(g)
        h = out
        params[index + 1], e = _after(g, (params[index + 1], e))
    head = lambda p: _head_loss(spec, p, h, batch["y"])
    (loss, z), g_head = jax.value_and_grad(head, has_aux=True)(params[-1])
    grads.append(g_head)
    return loss, z, grads


_STEPS = {"per_block": _per_block_step, "surrogate": _surrogate_step}


# -- the estimator --------------------------------------------------------------------------------------------


def _feedback_estimator(
    chain: Any,
    output_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    input_shape: Sequence[int],
    variant: F3Variant,
    output_activation: OutputActivation | None,
    train_targets: Any,
    feedback_init: FeedbackInit,
    mode: FeedbackMode,
    hidden_reduction: HiddenReduction,
    key: jax.Array,
) -> Estimator:
    spec = _make_spec(
        chain,
        output_loss,
        variant=variant,
        output_activation=output_activation,
        train_targets=train_targets,
        mode=mode,
        hidden_reduction=hidden_reduction,
    )
    feedback_init = check_feedback_init(feedback_init)
    input_shape = tuple(input_shape)
    step = _STEPS[spec.mode]

    def init(params):
        return _init_state(spec, params, input_shape=input_shape, feedback_init=feedback_init, key=key)

    def value_and_grad(params, state, batch, *, key=None):
        del key
        _check_params(spec.chain, params)
        _check_batch(batch, num_train=len(spec.targets) if spec.delayed else None)
        _check_state(spec, state)
        if state.feedback:
            num_outputs = state.feedback[0].shape[0]
        else:
            num_outputs = jax.eval_shape(spec.chain.apply, params, batch["x"]).shape[-1]
        t = encode_targets(jnp.asarray(batch["y"]), num_outputs, _dtype(params))
        if spec.delayed:
            safe_idx, in_range = _buffer_index(batch["idx"], state.errors.shape[0])
            rows = _read_buffer(state.errors, safe_idx)
        else:
            rows = None
        loss, z, grads = step(spec, params, state.feedback, batch, t, _error_before_forward(spec, rows, t))
        grads = _like(params, grads)
        if spec.delayed:
            errors = _write_buffer(state.errors, safe_idx, _stored_signal(spec, z, batch["y"], t))
            state = DelayedFeedbackState(state.feedback, errors)
            loss = _nan_unless(in_range, loss)
        return loss, grads, state

    return Estimator(init, value_and_grad)


_SHARED_ARGS_DOC = """
Args:
      chain: the model as blocks: a :class:`jaxalgo.models.ChainFn` (``params`` one dict per block), or a list
        of block functions ``block(params_l, h) -> h`` (or :func:`jaxalgo.models.chain_of` of one), ``params``
        then a list or tuple of per-block pytrees; ``grads`` come in the container of ``params``.
      output_loss: ``output_loss(z, y) -> scalar``, the mean over the batch of a per-example loss of the model
        output ``z`` (B, C) and the batch's ``y`` (labels (B,) or targets (B, C)), e.g.
        :func:`jaxalgo.losses.sigmoid_bce`.
      input_shape: the shape of one input example (to size the feedback matrices).
      output_activation: ``"sigmoid"``, ``"softmax"`` or ``"identity"``: ``y = act(z)`` in the error ``t - y``;
        ``None`` infers it from jaxalgo's losses (sigmoid_bce, softmax_cross_entropy, mse).
      feedback_init: one of :data:`jaxalgo.grads.FEEDBACK_INITS` (default Kaiming uniform).
      mode: ``"per_block"`` (default) or ``"surrogate"``; same updates (see the module docstring).
      hidden_reduction: ``"sum"`` (the reference's: a hidden block's update sums over the batch) or ``"mean"``;
        the last block always gets the gradient of the batch-mean loss. Adam is nearly invariant to this choice.
      key: the PRNG key of the feedback matrices (block ``l`` uses ``fold_in(key, l)``).
"""


def f3(
    chain: Any,
    output_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    input_shape: Sequence[int],
    train_targets: Any,
    variant: F3Variant = "delayed_error",
    output_activation: OutputActivation | None = None,
    feedback_init: FeedbackInit = "kaiming_uniform",
    mode: FeedbackMode = "per_block",
    hidden_reduction: HiddenReduction = "sum",
    key: jax.Array,
) -> Estimator:
    """F3: every hidden block learns from the delayed error of the same sample times a fixed random matrix.

    State: :class:`DelayedFeedbackState` (feedback matrices and the ``[N, C]`` error buffer, initialised to the
    encoded ``train_targets``); each batch must carry ``batch["idx"]``, the samples' positions in the training
    split. The variants without a buffer (``current_error``, ``one_hot_target``, ``zeros``) give DFA, DRTP and
    last-layer-only with :class:`FeedbackState`.

    {args}
      train_targets: the training split's labels (N,) or targets (N, C), in index order.
      variant: one of :data:`F3_VARIANTS`.

    Returns:
      An :class:`Estimator`: ``state = est.init(params)``, ``loss, grads, state = est.value_and_grad(params,
      state, batch, key=key)``; ``loss`` is the true loss of the batch at ``params``.

    Example::

      est = jaxalgo.grads.f3(fn, jaxalgo.losses.sigmoid_bce, input_shape=(64,), train_targets=ds.y_train,
                             key=jax.random.key(1))
    """
    return _feedback_estimator(
        chain,
        output_loss,
        input_shape=input_shape,
        variant=variant,
        output_activation=output_activation,
        train_targets=train_targets if variant in DELAYED_VARIANTS else None,
        feedback_init=feedback_init,
        mode=mode,
        hidden_reduction=hidden_reduction,
        key=key,
    )


def _fixed_error_estimator(variant: F3Variant) -> Callable[..., Estimator]:
    def build(
        chain: Any,
        output_loss: Callable[[jax.Array, jax.Array], jax.Array],
        *,
        input_shape: Sequence[int],
        output_activation: OutputActivation | None = None,
        feedback_init: FeedbackInit = "kaiming_uniform",
        mode: FeedbackMode = "per_block",
        hidden_reduction: HiddenReduction = "sum",
        key: jax.Array,
    ) -> Estimator:
        return _feedback_estimator(
            chain,
            output_loss,
            input_shape=input_shape,
            variant=variant,
            output_activation=output_activation,
            train_targets=None,
            feedback_init=feedback_init,
            mode=mode,
            hidden_reduction=hidden_reduction,
            key=key,
        )

    return build


dfa = _fixed_error_estimator(FEEDBACK_PRESETS["dfa"]["variant"])
dfa.__name__ = dfa.__qualname__ = "dfa"
dfa.__doc__ = """Direct feedback alignment (Nøkland 2016): hidden block ``l`` receives ``(t - y) B_l`` (current error).

    The same estimator as ``f3(..., variant="current_error")``; state :class:`FeedbackState`.

    {args}
    References:
      Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*, NeurIPS 2016.
    """

drtp = _fixed_error_estimator(FEEDBACK_PRESETS["drtp"]["variant"])
drtp.__name__ = drtp.__qualname__ = "drtp"
drtp.__doc__ = """Direct random target projection (Frenkel et al. 2021): hidden block ``l`` receives ``t B_l``.

    The same estimator as ``f3(..., variant="one_hot_target")``; ``t`` is the one-hot label (classification) or
    the target (regression). State :class:`FeedbackState`.

    {args}
    References:
      Frenkel, Lefebvre, Bol, *Learning Without Feedback*, Frontiers in Neuroscience 2021.
    """

last_layer_only = _fixed_error_estimator(FEEDBACK_PRESETS["llo"]["variant"])
last_layer_only.__name__ = last_layer_only.__qualname__ = "last_layer_only"
last_layer_only.__doc__ = """Last layer only (shallow learning): true gradient for the last block, zero for the rest.

    The same estimator as ``f3(..., variant="zeros")``: a lower baseline for the feedback methods.

    {args}
    """

for _fn in (f3, dfa, drtp, last_layer_only):
    _fn.__doc__ = (_fn.__doc__ or "").replace("{args}", _SHARED_ARGS_DOC.strip("\n"))


_BUILDERS_OF_FIXED_VARIANTS: dict[str, Callable[..., Estimator]] = {
    "current_error": dfa,
    "one_hot_target": drtp,
    "zeros": last_layer_only,
}


@dataclasses.dataclass(frozen=True)
class FeedbackOptions:
    """F3, DFA, DRTP and last-layer-only: fixed random feedback instead of backpropagated errors.

    The presets of :data:`FEEDBACK_PRESETS` pin the variant: ``dfa`` is ``current_error``, ``drtp``
    ``one_hot_target``, ``llo`` ``zeros``; ``f3`` leaves it free. The error ``t - y`` takes its output
    nonlinearity from the problem's ``loss_name`` (``LOSS_ACTIVATIONS``; inferred from ``output_loss`` when
    the name is None).

    Attributes:
      variant: the error fed back, one of F3_VARIANTS (f3's default: delayed_error; dfa: current_error; drtp:
        one_hot_target; llo: zeros).
      init: initialisation of the fixed feedback matrices, one of FEEDBACK_INITS.
      mode: per_block (each block's update right after its forward) or surrogate (one pure objective); the same
        updates.
      reduction: sum (the F3 reference's) or mean over the batch for the hidden blocks' updates.
    """

    variant: F3Variant = option("delayed_error", flag="f3_variant")
    init: FeedbackInit = option("kaiming_uniform", flag="feedback_init")
    mode: FeedbackMode = option("per_block", flag="feedback_mode")
    reduction: HiddenReduction = option("sum", flag="feedback_reduction")

    data_parallel: ClassVar[bool] = False
    pipeline: ClassVar[str] = "feedback"  # stages update from their own signal (jaxalgo.parallel.pipeline)

    def __post_init__(self):
        check_fields(self)

    def build(self, problem: Problem) -> Estimator:
        """The estimator on ``problem.chain`` and ``problem.output_loss``, its feedback drawn from ``problem.key``
        (a delayed variant's buffer starts from ``problem.train_targets``)."""
        delayed = self.variant in DELAYED_VARIANTS
        required = ("chain", "output_loss", "input_shape", "key", *(("train_targets",) if delayed else ()))
        problem.require(*required, by=method_name(self.variant))
        assert problem.output_loss is not None  # checked by require
        common: dict[str, Any] = dict(
            input_shape=problem.input_shape,
            output_activation=loss_activation(problem.loss_name),
            feedback_init=self.init,
            mode=self.mode,
            hidden_reduction=self.reduction,
            key=problem.key,
        )
        if delayed:
            return f3(
                problem.chain, problem.output_loss, train_targets=problem.train_targets, variant=self.variant, **common
            )
        return _BUILDERS_OF_FIXED_VARIANTS[self.variant](problem.chain, problem.output_loss, **common)
