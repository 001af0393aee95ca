"""The package's layout, read from its source with ``ast`` (nothing is imported).

Imports go one way only, down this order (README, "Layout"): a module may import
its own unit or a lower one, never a higher one.  A unit is a subpackage or a
top-level module.  No import cycle between units; no private name (``_x``)
imported or attribute-accessed across units, nor from the scripts that drive the
package (benchmarks, deploy, notebooks' generator); every module declares
``__all__``; subpackages' ``__init__`` re-export nothing; and no function is
longer than ``MAX_LINES`` except those allowed below, each with its reason.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "zarr_vectors_dask"
NAME = PKG.name

#: The layer order, lowest first.  Units of one rank may not import each other
#: in both directions (the cycle check), and never a unit of a higher rank.
RANK = {
    "errors": 0, "options": 0,
    "storage": 1,
    "format": 2, "fingerprint": 2,
    "planning": 3,
    "cluster": 4, "runtime": 4,
    "step": 5,
    "compose": 6,
    "resume": 7, "currency": 7,
    "api": 8,
    "sample": 9, "dropin": 9, "refresh": 9, "rerun": 9,
    "cli": 10, "cli_support": 10, "worker_signals": 10, "__init__": 10,
    "__main__": 11,
}

MAX_LINES = 80
#: Functions allowed over ``MAX_LINES``: (module, qualified name) -> why.
LONG_ALLOWED: dict[tuple[str, str], str] = {
    # none: every function is within the limit
}

#: Module paths the layout replaced: nothing may be left (or re-created) there.
OLD_MODULES = ("bill", "commit", "compose", "format", "graph", "handles", "lock", "pipeline",
               "plan", "stages", "store", "vertex_attributes")


def _modules(base: pathlib.Path):
    for path in sorted(base.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _dotted(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _unit(parts: list[str]) -> str:
    """``['zarr_vectors_dask', 'step', 'run']`` -> ``step``; the package itself -> ``__init__``."""
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``if TYPE_CHECKING:`` (not run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                lines.add(getattr(sub, "lineno", -1))
    return lines


def _imports(path: pathlib.Path, tree: ast.AST):
    """(line, target module parts, imported name or None, bound name) for every
    import of this package, at any depth (function-level imports count)."""
    here = _dotted(path)
    package = here if path.name == "__init__.py" else here[:-1]
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == NAME:
                    yield node.lineno, a.name.split("."), None, a.asname or a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != NAME:
                continue
            for a in node.names:
                yield node.lineno, target, a.name, a.asname or a.name


def _is_module(parts: list[str]) -> bool:
    p = ROOT.joinpath(*parts)
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _target(target: list[str], name: str | None) -> tuple[list[str], str | None]:
    """An imported name that is a submodule is that module, not a name in it."""
    if name is not None and _is_module(target + [name]):
        return target + [name], None
    return target, name


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_imports_go_down_the_layers_only():
    bad = []
    for path, tree in _modules(PKG):
        src = _unit(_dotted(path))
        assert src in RANK, f"{path.relative_to(ROOT)}: unit {src!r} has no rank in RANK"
        for line, target, name, _ in _imports(path, tree):
            dst = _unit(_target(target, name)[0])
            if dst != src and RANK[dst] > RANK[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} (rank {RANK[src]}) imports "
                           f"{'.'.join(target)} ({dst}, rank {RANK[dst]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = {}
    for path, tree in _modules(PKG):
        src = _unit(_dotted(path))
        for _, target, name, _ in _imports(path, tree):
            dst = _unit(_target(target, name)[0])
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    cycles = []

    def visit(node, trail):
        for nxt in sorted(edges.get(node, ())):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            else:
                visit(nxt, trail + [nxt])

    for unit in sorted(edges):
        visit(unit, [unit])
    assert not cycles, "import cycles between units:\n" + "\n".join(sorted(set(cycles)))


def _private_uses(path: pathlib.Path, tree: ast.AST, own_unit: str | None):
    """Private names of another unit: imported by name, or reached as an
    attribute of an imported module."""
    modules = {}  # bound name -> unit of the module it names
    for line, target, name, bound in _imports(path, tree):
        mod, attr = _target(target, name)
        unit = _unit(mod)
        if unit == own_unit:
            continue
        if attr is None:
            modules[bound] = unit
            if name is None and "." in bound:  # import a.b.c: reached as a.b.c.x
                modules[bound] = unit
        elif _private(attr):
            yield f"{path.relative_to(ROOT)}:{line}: imports {'.'.join(mod)}.{attr}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value)
            if owner in modules:
                yield f"{path.relative_to(ROOT)}:{node.lineno}: uses {owner}.{node.attr}"


def test_no_private_name_crosses_units():
    bad = []
    for path, tree in _modules(PKG):
        bad.extend(_private_uses(path, tree, _unit(_dotted(path))))
    for folder in ("benchmarks", "deploy", "notebooks"):
        for path, tree in _modules(ROOT / folder):
            bad.extend(_private_uses(path, tree, None))
    assert not bad, "private names used across units:\n" + "\n".join(bad)


def test_every_module_declares_all_and_subpackages_reexport_nothing():
    missing, reexports = [], []
    for path, tree in _modules(PKG):
        rel = path.relative_to(ROOT)
        if path.parent != PKG and path.name == "__init__.py":
            if any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                   for n in tree.body):
                reexports.append(str(rel))
            continue
        declared = [n for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        if not declared:
            missing.append(str(rel))
            continue
        defined = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                   if isinstance(t, ast.Name)}
        defined |= {n.name for n in tree.body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        defined |= {a.asname or a.name.split(".")[0] for n in tree.body
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        names = ast.literal_eval(declared[0].value)
        unknown = [x for x in names if x not in defined]
        assert not unknown, f"{rel}: __all__ names {unknown}, not defined there"
    assert not missing, f"modules without __all__: {missing}"
    assert not reexports, f"subpackage __init__ files with code (re-exports): {reexports}"


def test_old_module_paths_are_gone():
    left = [m for m in OLD_MODULES if (PKG / f"{m}.py").exists()]
    assert not left, f"modules the layout replaced are back: {left}"


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def long_functions() -> dict[tuple[str, str], int]:
    """(module, qualified name) -> lines, for every function over ``MAX_LINES``."""
    out = {}
    for path, tree in _modules(PKG):
        mod = ".".join(_dotted(path)[1:]) or "__init__"
        for qual, node in _functions(tree):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_LINES:
                out[(mod, qual)] = n
    return out


def test_no_function_is_longer_than_the_limit():
    found = long_functions()
    over = {k: n for k, n in found.items() if k not in LONG_ALLOWED}
    assert not over, "functions over %d lines: %s" % (
        MAX_LINES, ", ".join(f"{m}.{f} ({n})" for (m, f), n in sorted(over.items())))
    stale = [k for k in LONG_ALLOWED if k not in found]
    assert not stale, f"allowed long functions that are no longer long (drop them): {stale}"


@pytest.mark.parametrize("source, expected", [
    ("from ..step import run\n", ["zarr_vectors_dask.step.run"]),
    ("def f():\n    from ..runtime import execute\n", ["zarr_vectors_dask.runtime"]),
])
def test_the_checker_sees_relative_and_nested_imports(tmp_path, source, expected):
    """The checks above are only as good as ``_imports``: it resolves
    relative imports and finds those inside functions."""
    path = PKG / "format" / "probe.py"  # never written: parsed from the string
    got = [".".join(_target(t, n)[0]) for _, t, n, _ in _imports(path, ast.parse(source))]
    assert got == expected


def test_the_checker_flags_private_names_and_upward_imports():
    """The private-name check sees names imported and attributes reached
    through an imported module; the rank check sees an upward import."""
    script = ("from zarr_vectors_dask import api\n"
              "from zarr_vectors_dask.storage.store import _backoff\n"
              "import zarr_vectors_dask.step.run as r\n"
              "api._open(1)\nr._run_step\n")
    found = list(_private_uses(ROOT / "benchmarks" / "probe.py", ast.parse(script), None))
    assert sorted(x.split(": ", 1)[1] for x in found) == [
        "imports zarr_vectors_dask.storage.store._backoff", "uses api._open", "uses r._run_step"]
    probe = PKG / "storage" / "probe.py"
    targets = [_unit(_target(t, n)[0]) for _, t, n, _ in
               _imports(probe, ast.parse("from ..step import run\n"))]
    assert targets == ["step"] and RANK["step"] > RANK["storage"]
