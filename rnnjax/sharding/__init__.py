"""How work is placed on devices, below the front doors: mesh helpers, the data-parallel
context that :func:`rnnjax.scan` reads, and :class:`SequenceSharding`, the time axis split
that the parallel engines read. Users reach all of it through :mod:`rnnjax.distributed`.

This package imports nothing above :mod:`rnnjax.cell` and :mod:`rnnjax.sequence`, so the
scan, the method values and the engines can import it. (It is apart from
:mod:`rnnjax.distributed` because a package's ``__init__`` runs on the import of any of its
modules: one package cannot sit on two floors.)
"""
