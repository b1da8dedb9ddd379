import os

from hypothesis import settings

# tests/multidevice_checks.py sets XLA_FLAGS and needs 8 host devices: it runs only as the
# subprocess of tests/test_distributed.py, never imported by pytest's doctest collection.
collect_ignore = ["multidevice_checks.py"]

# Hypothesis profiles. "deterministic" (the default): the same examples on every run and
# machine, so that a run passes or fails for the code, not for the draw. "random":
# RNNJAX_HYPOTHESIS_PROFILE=random explores new examples on each run (or those of
# --hypothesis-seed=N), to look for failures the fixed draw does not hit.
settings.register_profile("deterministic", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("random", deadline=None, derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("RNNJAX_HYPOTHESIS_PROFILE", "deterministic"))
