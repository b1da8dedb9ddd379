"""The layering of DESIGN.md, checked on the source: rnnjax's import graph is a DAG, no
function-local import of an rnnjax module hides a cycle, no module reaches into another
package's private names, and modules stay small."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rnnjax"
MAX_LINES = 450


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: pathlib.Path):
    """``(node, imported module, names, at module level)`` for every import of an rnnjax module."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rnnjax"):
                    yield node, alias.name, [], id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rnnjax") and not node.level:
            names = [alias.name for alias in node.names]
            # ``from rnnjax.pkg import sub``: an edge to the submodule where there is one.
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            for target in subs or [node.module]:
                yield node, target, names, id(node) in top_level


def with_package_inits(direct: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph Python runs: importing ``a.b.c`` from outside package ``a.b`` first runs
    ``a/b/__init__.py`` (and ``a/__init__.py`` from outside ``a``), so each such package is an
    edge too. A package that contains the importing module is already initialised (or being
    initialised by the import that reached this module), so it adds no edge."""
    edges = {name: set() for name in direct}
    for name, targets in direct.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in direct and step not in own:
                    edges[name].add(step)
    return edges


def graph() -> dict[str, set[str]]:
    direct = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, target, _, _ in imports(path):
            if target in MODULES and target != name:
                direct[name].add(target)
    return with_package_inits(direct)


def test_the_import_graph_has_no_cycle():
    edges, state, stack = graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a graph with a cycle is reported."""
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    monkeypatch.setitem(globals(), "graph", lambda: fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> c -> a"):
        test_the_import_graph_has_no_cycle()


def test_the_cycle_check_sees_a_cycle_through_a_package_init(monkeypatch):
    """``low`` imports ``pkg.a``, which runs ``pkg/__init__.py``, which imports ``pkg.b``, which
    imports ``low``: a cycle no module-to-module edge shows."""
    direct = {"low": {"pkg.a"}, "pkg": {"pkg.a", "pkg.b"}, "pkg.a": set(), "pkg.b": {"low"}}
    assert with_package_inits(direct)["low"] == {"pkg", "pkg.a"}
    monkeypatch.setitem(globals(), "graph", lambda: with_package_inits(direct))
    with pytest.raises(pytest.fail.Exception, match="import cycle: low -> pkg -> pkg.b -> low"):
        test_the_import_graph_has_no_cycle()


def test_engines_import_neither_the_front_door_nor_each_others_privates():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("rnnjax.engines"):
            assert not targets & {"rnnjax.scan", "rnnjax.methods", "rnnjax.layers", "rnnjax"}, (name, targets)
    for low in ("rnnjax.sharding.data", "rnnjax.sharding.mesh", "rnnjax.scan", "rnnjax.methods"):
        assert not {t for t in edges[low] if t.startswith("rnnjax.distributed")}, (low, edges[low])


# DESIGN.md's floors, top to bottom: a module imports its own floor or lower ones only.
FLOORS = [
    ("rnnjax",),
    ("rnnjax.flax", "rnnjax.equinox", "rnnjax.train"),
    ("rnnjax.inspect", "rnnjax.interop"),
    ("rnnjax.layers", "rnnjax.parallel", "rnnjax.distributed", "rnnjax.linear_attention"),
    ("rnnjax.scan",),
    ("rnnjax.methods", "rnnjax.tuning"),
    ("rnnjax.engines",),
    ("rnnjax.sharding",),
    ("rnnjax.sequence",),
    ("rnnjax.cells", "rnnjax.precision"),
    ("rnnjax.cell", "rnnjax.carry", "rnnjax.ops", "rnnjax.checks", "rnnjax.optional"),
]


def floor_of(name: str) -> int:
    """The floor of module ``name``: 0 is the top; its longest listed prefix decides."""
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            inside = name == prefix or (prefix != "rnnjax" and name.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (level, prefix)
    assert best is not None, f"{name} is on no floor: add it to FLOORS (DESIGN.md's picture)"
    return best[0]


def test_imports_point_down_the_floors():
    up = [f"{name} -> {t}" for name, targets in graph().items() for t in targets if floor_of(t) < floor_of(name)]
    assert not up, up


def test_the_floor_check_sees_an_upward_import(monkeypatch):
    monkeypatch.setitem(globals(), "graph", lambda: {"rnnjax.engines.linear": {"rnnjax.scan"}})
    with pytest.raises(AssertionError, match="rnnjax.engines.linear -> rnnjax.scan"):
        test_imports_point_down_the_floors()


def test_no_function_local_import_of_an_rnnjax_module():
    local = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in MODULES.values()
             for node, _, _, top in imports(path) if not top]
    assert not local, local


def test_no_module_imports_another_packages_private_names():
    offenders = []
    sources = list(MODULES.values()) + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    for path in sources:
        own = module_name(path).rsplit(".", 1)[0] if path.is_relative_to(PACKAGE) else None
        for node, target, names, _ in imports(path):
            for n in names:
                private = n.startswith("_") and not n.startswith("__")
                # Within one package (e.g. rnnjax.flax) private helpers may be shared.
                if private and not (own and target.startswith(own)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n} from {target}")
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                if not (own and target.startswith(own)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines < MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines; split it by concept"
