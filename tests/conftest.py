import ctypes
import ctypes.util
import gc
import os
import sys

import jax
import pytest
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


# The tests that share one xdist worker under --dist loadgroup (the Makefile's), by node-id
# prefix: each group's tests need one expensive subprocess, which tests/once.py runs once per
# session; on one worker, no other worker waits on its lock. Their modules mark them
# xdist_group(name) too, and pytest_collection_modifyitems checks that the two agree. (xdist
# groups by a suffix it adds to the node ids of marked tests, which pytest 9.2 no longer keeps,
# pytest-dev/pytest-xdist#1386; its scheduler, in the controller process, sees node ids only.)
XDIST_GROUPS = {
    "tests/test_cores.py::": "four_cores",
    "tests/test_distributed.py::test_multidevice": "multidevice",
    "tests/test_distributed.py::test_every_multidevice_check_ran": "multidevice",
    "tests/test_multiprocess.py::": "multiprocess",
}


def xdist_group_of(nodeid):
    """The group in XDIST_GROUPS of the test ``nodeid``, or None."""
    return next((group for prefix, group in XDIST_GROUPS.items() if nodeid.startswith(prefix)), None)


class XdistGroups:
    """The plugin that gives --dist loadgroup the groups of XDIST_GROUPS (registered when xdist runs).

    It overrides ``LoadGroupScheduling._split_scope``, a private method, because no public
    mechanism remains: the public ``xdist_group`` mark alone spread a group's tests over both
    workers (checked 2026-12-06, pytest 9.2.0, pytest-xdist 3.8.0), and ``--dist loadfile``
    would put all of a large file on one worker."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling  # xdist is optional: -p no:xdist runs without it

        class GroupScheduling(LoadGroupScheduling):
            def _split_scope(self, nodeid):
                return xdist_group_of(nodeid) or super()._split_scope(nodeid)

        return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        listed = xdist_group_of(item.nodeid)
        if marked != ({listed} if listed else set()):
            raise pytest.UsageError(f"{item.nodeid} is marked xdist_group {sorted(marked)} but XDIST_GROUPS in "
                                    f"tests/conftest.py gives it {listed!r}: make them agree")


FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def pytest_addoption(parser):
    parser.addoption(
        "--fast-compile",
        action="store_true",
        help="compile for compile speed (XLA at optimisation level 0, elemental fusion emitters): make test's setting",
    )


def pytest_configure(config):
    """With ``--fast-compile`` (``make test`` passes it) the tests compile with XLA's LLVM backend at
    optimisation level 0 (``jax_disable_most_optimizations``) and XLA:CPU's older elemental
    emitters for fusions (``--xla_cpu_use_fusion_emitters=false``) in place of its MLIR fusion
    emitters.

    The suite's time goes into compiling many small programs (about 0.1 s each, whatever their
    size), and these cut it: the first by a third (measured: tests/test_cells.py and
    tests/test_parallel.py, 214 -> 149 s of CPU), the second by 40% more (tests/test_scan.py
    and tests/test_layers.py, 55 -> 31 s). XLA's HLO passes (fusion, layouts, buffer
    assignment) are unchanged, and so is every assertion; the machine code is less optimised,
    and results can differ from the default build's in the last bits of float32, as they do
    between backends; two different programs that give the same bits under the defaults can
    differ there, so a test asserting that is marked slow (as in tests/test_train.py).
    ``make test-all`` (CI) keeps JAX's defaults. The environment variables
    carry the settings to the subprocesses tests start; XLA reads its flags when JAX starts
    its backend, after this hook.
    """
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistGroups(), "rnnjax-xdist-groups")
    else:  # xdist registers its mark; without it (-p no:xdist) the mark is still known
        config.addinivalue_line("markers", "xdist_group(name): run on the xdist worker of the group's other tests")
    if config.getoption("fast_compile"):
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        jax.config.update("jax_disable_most_optimizations", True)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()


# A worker's compiled programs stay cached for the whole session (jax.jit's caches, among them
# rnnjax.scan's one evaluate function per cell and method), and each XLA:CPU executable holds about
# six memory mappings. Linux allows a process 65530 (vm.max_map_count): a test-all worker that had
# compiled some ten thousand programs segfaulted in XLA's compiler when the next mapping failed
# (CI, and here at the same test: tests/test_linear_attention_delta_parity.py, two thirds of the
# way through). Past MAP_LIMIT mappings, or RESIDENT_LIMIT bytes of memory, the caches are
# dropped between modules (a module's own programs stay shared within it).
MAP_LIMIT = 20000
RESIDENT_LIMIT = 3 * 2**30


def _count_maps() -> int | None:
    """This process's memory mappings (Linux /proc), or None where they cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    """Hand the freed heap back to the system (glibc keeps it otherwise); nothing elsewhere."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    yield
    maps, resident = _count_maps(), _resident_bytes()
    if (maps or 0) > MAP_LIMIT or (resident or 0) > RESIDENT_LIMIT:
        jax.clear_caches()
        gc.collect()
        _malloc_trim()
        if os.environ.get("RNNJAX_TEST_MEMORY"):
            print(f"\n[memory] {maps} maps, {(resident or 0) / 2**30:.2f} GiB -> {_count_maps()} maps, "
                  f"{(_resident_bytes() or 0) / 2**30:.2f} GiB", file=sys.stderr)
