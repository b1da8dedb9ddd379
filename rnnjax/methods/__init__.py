"""Method values: how :func:`rnnjax.scan` evaluates a recurrence.

Each method is a small frozen, hashable value that checks its options when it is built and
says which cells it can run (:meth:`Method.check`), in the style of optax's gradient
transformations::

    rj.Sequential(unroll="auto", remat=None, gradient="autodiff")   # any cell
    rj.Associative()                  # LinearCell (or clipped): one associative scan, O(log T) depth
    rj.Chunked(size=None)             # the same cells: sequential in chunks, associative across
    rj.Newton("auto", tol="auto", max_iters=50, init="zero")  # any cell, in parallel
    rj.Kernel(block_batch=16)         # a dense cell in one GPU kernel per direction
    rj.Auto()                         # one of the above per backend, cell kind and T
    rj.TimeSharded(method, sharding)  # Associative or Newton with time split over devices

The strings ``"sequential"``, ``"associative"``, ``"chunked"``, ``"newton"``, ``"kernel"``
and ``"auto"`` stand for each method's default value. Every method gives the sequential method's outputs
and final carry, with the same meaning of ``lengths``, ``resets`` and ``reverse``, within
float rounding (linear methods: within ``1e-5`` in float32 for moderate ``T``; Newton:
within about ``tol / (1 - rho)`` for a cell contracting at rate ``rho``).

One value per file (:mod:`rnnjax.methods.sequential`, ``linear``, ``newton``, ``kernel``,
``auto``); :mod:`rnnjax.methods.base` holds the protocol and the registry of names. A new
engine is its method value here (a file, and a line below), one file in
:mod:`rnnjax.engines`, and a test.
"""

from rnnjax.methods.auto import Auto, TimeSharded
from rnnjax.methods.base import BY_NAME, Method, as_method, methods_for
from rnnjax.methods.default import default_method, method_for
from rnnjax.methods.kernel import Kernel
from rnnjax.methods.linear import Associative, Chunked
from rnnjax.methods.newton import Newton
from rnnjax.methods.sequential import GRADIENTS, REMAT, Sequential

__all__ = [
    "BY_NAME",
    "GRADIENTS",
    "REMAT",
    "Associative",
    "Auto",
    "Chunked",
    "Kernel",
    "Method",
    "Newton",
    "Sequential",
    "TimeSharded",
    "as_method",
    "default_method",
    "method_for",
    "methods_for",
]
