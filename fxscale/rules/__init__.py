"""THE rule table: ATen op -> a sound bound on its output, from bounds on its inputs.

Both the eager :class:`fxscale.scaled.ScaledTensor` and the compiler's bounds pass use this
table. A rule is a small pure function of a :class:`RuleCall` (input :class:`Bound`\\ s by
schema argument name, shapes, constant arguments) that returns the output's :class:`Bound`
(or a tuple of them for ops with several outputs). Bounds may be floats or 0-d tensors, so
the same rule runs at compile time and, for scales that depend on run-time measurements,
inside the transformed graph.

Two strengths (DESIGN decision 3), chosen by ``mode``:

* ``"rownorm"`` (default): tracks absmax plus L2/L1 row and column norms and the spectral
  norm; ``a @ b`` is bounded by Cauchy-Schwarz, ``|out_ij| <= ||a_i|| ||b_:j||``.
* ``"absmax"``: the seed notebook's rule, ``|a @ b| <= max|a| max|b| K``, kept for comparison.

>>> from fxscale.rules import Arg, Bound, evaluate
>>> import torch
>>> a, b = Arg(Bound(1.0), (4, 64)), Arg(Bound(1.0), (64, 8))
>>> evaluate(torch.ops.aten.mm.default, (a, b), {}, [(4, 8)], mode="absmax")[0].absmax
64.5
"""

from ..bound import Bound

# The table itself: importing the rule modules registers every rule, once, here.
from . import normalisation, numeric, parallel, reductions, shape  # noqa: F401
from .helpers import add_bias, as_matrix_lhs, as_matrix_rhs, bcast, const_float, matmul_bound
from .registry import MARGIN, RULES, Arg, Rule, RuleCall, Unbounded, evaluate, lookup, normalise, register

__all__ = [
    "MARGIN", "RULES", "Arg", "Bound", "Rule", "RuleCall", "Unbounded", "add_bias", "as_matrix_lhs", "as_matrix_rhs",
    "bcast", "const_float", "evaluate", "lookup", "matmul_bound", "normalise", "register",
]
