# tests/multidevice_checks.py sets XLA_FLAGS and needs 8 host devices: it runs only as the
# subprocess of tests/test_distributed.py, never imported by pytest's doctest collection.
collect_ignore = ["multidevice_checks.py"]
