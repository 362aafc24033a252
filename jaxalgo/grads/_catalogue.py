"""The estimator catalogue: one line per command-line name; each name is an options class and the fields it pins.

``fg`` / ``frog`` are the forward gradient with the mean / the orthogonal projection (FROG), as optax's ``nadam``
is ``adam`` with ``nesterov=True``; ``-rank1`` pins rank-1 tangents, ``-activity`` perturbs block outputs; ``dfa``,
``drtp`` and ``llo`` are the feedback estimator with its error variant pinned; ``zo`` / ``zo-frog`` are the
two-point zeroth-order estimator. Adding an estimator is its own module (function and options class) plus one
line here.
"""

from __future__ import annotations

from jaxalgo.grads._activity import ActivityOptions
from jaxalgo.grads._estimator import BackpropOptions
from jaxalgo.grads._f3 import FEEDBACK_PRESETS, FeedbackOptions
from jaxalgo.grads._fa import FAOptions
from jaxalgo.grads._forward import ForwardOptions
from jaxalgo.grads._zo import ZeroOrderOptions
from jaxalgo.options import Catalogue, Entry

_MEAN = {"aggregation": "mean"}
_PROJECTION = {"aggregation": "orthogonal_projection"}

ESTIMATORS: Catalogue = {
    "backprop": Entry(BackpropOptions, help="the exact gradient"),
    "fg": Entry(ForwardOptions, fixed=_MEAN, help="forward gradient, mean of k tangents"),
    "frog": Entry(ForwardOptions, fixed=_PROJECTION, help="forward gradient, orthogonal projection (FROG)"),
    "fg-rank1": Entry(ForwardOptions, fixed={**_MEAN, "tangent_dist": "rank1"}, help="fg with rank-1 tangents"),
    "frog-rank1": Entry(ForwardOptions, fixed={**_PROJECTION, "tangent_dist": "rank1"}, help="frog, rank-1 tangents"),
    "fg-activity": Entry(ActivityOptions, fixed=_MEAN, help="activity perturbation, mean"),
    "frog-activity": Entry(ActivityOptions, fixed=_PROJECTION, help="activity perturbation, projection"),
    "zo": Entry(ZeroOrderOptions, fixed=_MEAN, help="two-point zeroth order (MeZO / SPSA), mean"),
    "zo-frog": Entry(ZeroOrderOptions, fixed=_PROJECTION, help="two-point zeroth order, projection"),
    "f3": Entry(FeedbackOptions, fixed=FEEDBACK_PRESETS["f3"], help="F3: the error of the previous epoch, fed back"),
    "dfa": Entry(FeedbackOptions, fixed=FEEDBACK_PRESETS["dfa"], help="direct feedback alignment"),
    "drtp": Entry(FeedbackOptions, fixed=FEEDBACK_PRESETS["drtp"], help="direct random target projection"),
    "llo": Entry(FeedbackOptions, fixed=FEEDBACK_PRESETS["llo"], help="last layer only"),
    "fa": Entry(FAOptions, help="feedback alignment (dense chains)"),
}
"""The estimator catalogue: name -> :class:`jaxalgo.options.Entry`."""
