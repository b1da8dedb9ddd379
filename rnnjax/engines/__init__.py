"""How each method runs on the canonical form (:class:`rnnjax.sequence.TimeMajor`).

Every engine takes ``(cell, params, seqs, ...)`` and returns ``(ys_tm, final_carry, info)``:
outputs ``(T, *batch, *out)`` aligned with ``seqs.xs``, the carry after each sequence's last
real step, and what the engine reports about itself (``None``, or a Newton solve's
:class:`rnnjax.engines.newton.NewtonInfo`). Engines import the sequence module and the cell
protocol; the front door (:func:`rnnjax.scan`) and the method values import them.
"""
