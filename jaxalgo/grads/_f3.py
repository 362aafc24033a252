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

References:
  Flügel, Coquelin, Weiel, Debus, Streit, Götz, *Feed-Forward Optimization With Delayed Feedback for Neural
  Networks*, ICONIP 2024 (arXiv 2304.13372).
  Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*, NeurIPS 2016.
  Frenkel, Lefebvre, Bol, *Learning Without Feedback: Fixed Random Learning Signals Allow for Feedforward
  Training of Deep Neural Networks*, Frontiers in Neuroscience 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalgo import losses as _losses
from jaxalgo.grads._estimator import Estimator, check_float_params, check_scalar_loss
from jaxalgo.grads._feedback import check_feedback_init, feedback_matrices

F3_VARIANTS: tuple[str, ...] = (
    "delayed_error",
    "delayed_loss",
    "delayed_error_one_hot",
    "delayed_loss_one_hot",
    "delayed_error_softmax",
    "delayed_loss_softmax",
    "current_error",
    "one_hot_target",
    "zeros",
)
DELAYED_VARIANTS: tuple[str, ...] = tuple(v for v in F3_VARIANTS if v.startswith("delayed"))
MODES: tuple[str, ...] = ("per_block", "surrogate")
HIDDEN_REDUCTIONS: tuple[str, ...] = ("sum", "mean")
OUTPUT_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": jax.nn.softmax,
    "identity": lambda z: z,
}
_KNOWN_LOSS_ACTIVATIONS = {
    _losses.sigmoid_bce: "sigmoid",
    _losses.softmax_cross_entropy: "softmax",
    _losses.mse: "identity",
}


class FeedbackState(NamedTuple):
    """State of DFA, DRTP, last-layer-only and FA: the fixed feedback matrices (never trained)."""

    feedback: tuple[jax.Array, ...]


class DelayedFeedbackState(NamedTuple):
    """State of F3: the fixed feedback matrices and the delayed error buffer ``errors`` of shape ``[N, C]``."""

    feedback: tuple[jax.Array, ...]
    errors: jax.Array


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(allowed)}")
    return value


def resolve_output_activation(output_loss: Callable, output_activation: str | None) -> str:
    """The output nonlinearity ``y = act(z)`` whose error ``t - y`` feeds back; inferred for jaxalgo's losses."""
    if output_activation is None:
        if output_loss not in _KNOWN_LOSS_ACTIVATIONS:
            raise ValueError(
                "output_activation: got None with a custom output_loss; pass one of "
                f"{', '.join(OUTPUT_ACTIVATIONS)} (the nonlinearity your loss applies to the model output)"
            )
        return _KNOWN_LOSS_ACTIVATIONS[output_loss]
    return _check_choice("output_activation", output_activation, tuple(OUTPUT_ACTIVATIONS))


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


class _Setup(NamedTuple):
    """What every feedback estimator derives from the model before the first step."""

    num_outputs: int
    hidden_widths: tuple[int, ...]
    dtype: Any


def _model_setup(chain: Any, input_shape: Sequence[int], params: Any) -> _Setup:
    check_float_params(params)
    if len(params) != chain.num_blocks:
        raise ValueError(f"params: got {len(params)} blocks, the chain has {chain.num_blocks}")
    shapes = block_output_shapes(chain, input_shape, params)
    if len(shapes[-1]) != 1:
        raise ValueError(f"chain: the last block must output (B, C); its output per example is {shapes[-1]}")
    dtype = jax.tree_util.tree_leaves(params[-1])[0].dtype
    return _Setup(shapes[-1][0], tuple(math.prod(s) for s in shapes[:-1]), dtype)


def _check_batch(batch: Any, *, needs_idx: bool) -> None:
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch: expected a dict with keys 'x' and 'y' (and 'idx' for F3's delayed error)")
    if needs_idx:
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


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array, or None while tracing (values unknown)."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return None


def _feedback_estimator(
    chain: Any,
    output_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    input_shape: Sequence[int],
    variant: str,
    output_activation: str | None,
    train_targets: Any,
    feedback_init: str,
    mode: str,
    hidden_reduction: str,
    key: jax.Array,
) -> Estimator:
    if not hasattr(chain, "apply_block") or not hasattr(chain, "num_blocks"):
        raise TypeError(f"chain: expected a jaxalgo.models.ChainFn, got {type(chain).__name__}")
    if not callable(output_loss):
        raise TypeError(f"output_loss: expected a callable, got {type(output_loss).__name__}")
    variant = _check_choice("variant", variant, F3_VARIANTS)
    feedback_init = check_feedback_init(feedback_init)
    mode = _check_choice("mode", mode, MODES)
    hidden_reduction = _check_choice("hidden_reduction", hidden_reduction, HIDDEN_REDUCTIONS)
    activation = resolve_output_activation(output_loss, output_activation)
    delayed = variant in DELAYED_VARIANTS
    if (variant.endswith("_one_hot") or variant.endswith("_softmax")) and activation == "identity":
        raise ValueError(
            f"variant: {variant!r} needs class targets; with identity outputs (regression) use "
            "delayed_error or delayed_loss"
        )
    targets = None
    if delayed:
        if train_targets is None:
            raise ValueError(f"train_targets: variant {variant!r} needs the training targets to initialise its buffer")
        targets = np.asarray(train_targets)
        if targets.ndim not in (1, 2) or len(targets) == 0:
            raise ValueError(f"train_targets: expected labels (N,) or targets (N, C) with N >= 1, got {targets.shape}")
    input_shape = tuple(input_shape)
    num_blocks = chain.num_blocks
    act = OUTPUT_ACTIVATIONS[activation]

    def init(params):
        setup = _model_setup(chain, input_shape, params)
        shapes = [(setup.num_outputs, n) for n in setup.hidden_widths]
        feedback = feedback_matrices(key, shapes, feedback_init, setup.dtype)
        if not delayed:
            return FeedbackState(feedback)
        if targets.ndim == 2 and targets.shape[1] != setup.num_outputs:
            raise ValueError(
                f"train_targets: shape {targets.shape} does not match the model's {setup.num_outputs} outputs"
            )
        if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
            if targets.min() < 0 or targets.max() >= setup.num_outputs:
                raise ValueError(
                    f"train_targets: labels must lie in [0, {setup.num_outputs}), got "
                    f"[{targets.min()}, {targets.max()}]"
                )
        errors = encode_targets(jnp.asarray(targets), setup.num_outputs, setup.dtype)
        return DelayedFeedbackState(feedback, errors)

    def head_loss(head_params, h, y):
        z = chain.apply_block(num_blocks - 1, head_params, h)
        loss = output_loss(z, y)
        check_scalar_loss(loss, has_aux=False)
        return loss, z

    def output_signal(z, y, t, kind):
        """The vector a delayed variant stores for each sample (rows of ``B x C``), from this forward pass."""
        z = jax.lax.stop_gradient(z)
        if kind == "delayed_error":
            return t - act(z)
        if kind == "delayed_loss":
            return -z.shape[0] * jax.grad(lambda u: output_loss(u, y))(z)
        if kind == "delayed_error_softmax":
            return t - jax.nn.softmax(z)
        # delayed_loss_softmax: minus the gradient of the softmax cross-entropy with targets t
        return -z.shape[0] * jax.grad(lambda u: -jnp.sum(t * jax.nn.log_softmax(u), axis=-1).mean())(z)

    def stored_kind():
        return variant.removesuffix("_one_hot")

    def hidden_cotangent(e, matrix, shape):
        scale = 1.0 if hidden_reduction == "sum" else 1.0 / e.shape[0]
        return (scale * (e @ matrix)).reshape(shape).astype(matrix.dtype)

    def error_before_forward(state, batch, t):
        """``e`` when it does not depend on this step's forward pass, else None (DFA)."""
        if variant == "one_hot_target":
            return t
        if variant == "zeros":
            return jnp.zeros_like(t)
        if delayed:
            rows = state.errors[batch["idx"]]
            return t * rows if variant.endswith("_one_hot") else rows
        return None

    def current_error(z, t):
        return t - act(jax.lax.stop_gradient(z))

    def surrogate_step(params, state, batch, t, e):
        def objective(params):
            hidden, h = [], batch["x"]
            for index in range(num_blocks - 1):
                h = chain.apply_block(index, params[index], jax.lax.stop_gradient(h))
                hidden.append(h)
            loss, z = head_loss(params[-1], jax.lax.stop_gradient(h), batch["y"])
            signal = current_error(z, t) if e is None else e
            signal = jax.lax.stop_gradient(signal)
            feedback_term = sum(
                (
                    jnp.vdot(h_l, hidden_cotangent(signal, b_l, h_l.shape))
                    for h_l, b_l in zip(hidden, state.feedback, strict=True)
                ),
                start=jnp.zeros((), loss.dtype),
            )
            return loss + feedback_term, (loss, z)

        (_, (loss, z)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, z, grads

    def per_block_step(params, state, batch, t, e):
        if e is None:  # DFA: the current error needs the output before any block's update is known
            e = current_error(chain.apply(params, batch["x"]), t)
        grads, h, params = [], batch["x"], list(params)
        for index in range(num_blocks - 1):
            out, block_vjp = jax.vjp(lambda p, i=index, h_in=h: chain.apply_block(i, p, h_in), params[index])
            (g,) = block_vjp(hidden_cotangent(e, state.feedback[index], out.shape))
            grads.append(g)
            h = out
            params[index + 1], e = _after(g, (params[index + 1], e))
        (loss, z), g_head = jax.value_and_grad(head_loss, has_aux=True)(params[-1], h, batch["y"])
        grads.append(g_head)
        return loss, z, tuple(grads)

    def value_and_grad(params, state, batch, *, key=None):
        del key
        check_float_params(params)
        _check_batch(batch, needs_idx=delayed)
        expected = DelayedFeedbackState if delayed else FeedbackState
        if not isinstance(state, expected):
            raise TypeError(
                f"state: expected a {expected.__name__} from this estimator's init, got {type(state).__name__}"
            )
        if len(state.feedback) != num_blocks - 1:
            raise ValueError(
                f"state: holds {len(state.feedback)} feedback matrices, the chain has {num_blocks - 1} hidden blocks"
            )
        if delayed:
            if state.errors.shape[0] != len(targets):
                raise ValueError(
                    f"state.errors: the delayed error buffer has {state.errors.shape[0]} rows but the training "
                    f"set has {len(targets)} examples; build the estimator with this data set's train_targets"
                )
            idx_np = _concrete(batch["idx"])
            if idx_np is not None and idx_np.size:
                if idx_np.min() < 0 or idx_np.max() >= len(targets):
                    raise ValueError(
                        f"batch['idx']: indices must lie in [0, {len(targets)}), got [{idx_np.min()}, {idx_np.max()}]"
                    )
        num_outputs = state.feedback[0].shape[0] if state.feedback else None
        if num_outputs is None:
            num_outputs = jax.eval_shape(chain.apply, params, batch["x"]).shape[-1]
        dtype = jax.tree_util.tree_leaves(params[-1])[0].dtype
        t = encode_targets(jnp.asarray(batch["y"]), num_outputs, dtype)
        e = error_before_forward(state, batch, t)
        step = per_block_step if mode == "per_block" else surrogate_step
        loss, z, grads = step(params, state, batch, t, e)
        if delayed:
            rows = output_signal(z, batch["y"], t, stored_kind())
            state = DelayedFeedbackState(state.feedback, state.errors.at[batch["idx"]].set(rows.astype(dtype)))
        return loss, tuple(grads), state

    return Estimator(init, value_and_grad)


_SHARED_ARGS_DOC = """
    Args:
      chain: the model's pure function (:class:`jaxalgo.models.ChainFn`); ``params`` is one dict per block.
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
    variant: str = "delayed_error",
    output_activation: str | None = None,
    feedback_init: str = "kaiming_uniform",
    mode: str = "per_block",
    hidden_reduction: str = "sum",
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


def _fixed_error_estimator(variant: str) -> Callable[..., Estimator]:
    def build(
        chain: Any,
        output_loss: Callable[[jax.Array, jax.Array], jax.Array],
        *,
        input_shape: Sequence[int],
        output_activation: str | None = None,
        feedback_init: str = "kaiming_uniform",
        mode: str = "per_block",
        hidden_reduction: str = "sum",
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


dfa = _fixed_error_estimator("current_error")
dfa.__name__ = dfa.__qualname__ = "dfa"
dfa.__doc__ = """Direct feedback alignment (Nøkland 2016): hidden block ``l`` receives ``(t - y) B_l`` (current error).

    The same estimator as ``f3(..., variant="current_error")``; state :class:`FeedbackState`.
    {args}
    References:
      Nøkland, *Direct Feedback Alignment Provides Learning in Deep Neural Networks*, NeurIPS 2016.
    """

drtp = _fixed_error_estimator("one_hot_target")
drtp.__name__ = drtp.__qualname__ = "drtp"
drtp.__doc__ = """Direct random target projection (Frenkel et al. 2021): hidden block ``l`` receives ``t B_l``.

    The same estimator as ``f3(..., variant="one_hot_target")``; ``t`` is the one-hot label (classification) or
    the target (regression). State :class:`FeedbackState`.
    {args}
    References:
      Frenkel, Lefebvre, Bol, *Learning Without Feedback*, Frontiers in Neuroscience 2021.
    """

last_layer_only = _fixed_error_estimator("zeros")
last_layer_only.__name__ = last_layer_only.__qualname__ = "last_layer_only"
last_layer_only.__doc__ = """Last layer only (shallow learning): true gradient for the last block, zero for the rest.

    The same estimator as ``f3(..., variant="zeros")``: a lower baseline for the feedback methods.
    {args}
    """

for _fn in (f3, dfa, drtp, last_layer_only):
    _fn.__doc__ = _fn.__doc__.replace("{args}", _SHARED_ARGS_DOC.strip("\n"))
