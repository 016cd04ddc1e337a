"""The core never imports the layer above it, not even lazily inside a function.

The core (formulas, state, methods, adapters, kernels) must be usable and testable without the API,
the command line or the evaluation harness, and an upward import is how import cycles start: the
FLOPs formula once imported ``vtc.api`` to resolve specs, which closed a circle through the adapters.
This test reads every module's source with ``ast`` (no import runs) and lists each ``vtc`` module it
imports: ``import``, ``from ... import`` (relative too) and ``importlib.import_module`` /
``__import__`` with a literal name, wherever they appear.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vtc"

CORE = (
    "vtc.flops",
    "vtc.state",
    "vtc.method",
    "vtc.config",
    "vtc.registry",
    "vtc.errors",
    "vtc.compose",
    "vtc.surface",
    "vtc.contexts",
    "vtc.budget",
    "vtc.roles",
    "vtc.progress",
    "vtc.engine",
    "vtc.adapters",
    "vtc.kernels",
    "vtc.methods",
)
# ``vtc`` itself (its __init__) assembles the public API from both layers, so it counts as upper.
UPPER = (
    "vtc",
    "vtc.__main__",
    "vtc.api",
    "vtc.measure",
    "vtc.cli",
    "vtc.eval",
    "vtc.demo",
    "vtc.bench",
    "vtc.oracle",
    "vtc.reference",
    "vtc.stream",
)
# The FLOPs formula takes shapes and counts; resolving names and specs is vtc.measure's job.
FLOPS_MUST_NOT_IMPORT = ("vtc.adapters", "vtc.method", "vtc.methods", "vtc.config", "vtc.api")


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `module` is one of `prefixes` or inside one of those packages."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    """``"core"`` or ``"upper"``: the longest entry of CORE / UPPER that holds `module` decides.

    ``vtc`` holds only itself (its __init__), not every module of the package.
    """
    entries = [(p, name) for name, group in (("core", CORE), ("upper", UPPER)) for p in group]
    holding = [(len(p), name) for p, name in entries if module == p or (p != "vtc" and within(module, (p,)))]
    if not holding:
        raise AssertionError(f"{module} is in neither layer; add it to CORE or UPPER in tests/test_layering.py")
    return max(holding)[1]


def module_sources(root: Path = PACKAGE) -> dict[str, str]:
    """``{dotted module name: source}`` for every ``.py`` file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text()
    return out


def imported_modules(name: str, source: str, known: set[str]) -> set[str]:
    """The ``vtc`` modules that module `name` imports anywhere in `source`.

    ``from vtc import kernels`` imports ``vtc.kernels`` when that is a module in `known`, and names the
    package ``vtc`` (its __init__) otherwise.
    """
    is_package = name in {k.rsplit(".", 1)[0] for k in known if "." in k} or name == "vtc"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.add(node.args[0].value)
    return {m for m in found if m == "vtc" or m.startswith("vtc.")}


def _dynamic_import(node: ast.Call) -> bool:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    literal = bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
    return called in ("import_module", "__import__") and literal


def upward_imports(sources: dict[str, str]) -> list[str]:
    """``"core -> upper"`` for every core module that imports an upper-layer module."""
    known = set(sources)
    bad = []
    for name, source in sources.items():
        if layer(name) != "core":
            continue
        for target in sorted(imported_modules(name, source, known)):
            if layer(target) == "upper":
                bad.append(f"{name} -> {target}")
    return bad


def test_every_module_is_in_a_layer():
    for name in module_sources():
        layer(name)  # raises for a module nobody placed


def test_the_core_imports_no_upper_layer_module():
    sources = module_sources()
    edges = {(n, t) for n, s in sources.items() for t in imported_modules(n, s, set(sources))}
    # The scan must see the package's real imports, or an empty result would prove nothing.
    assert ("vtc.state", "vtc.flops") in edges and ("vtc.api", "vtc.adapters") in edges
    assert ("vtc.engine.compaction", "vtc.kernels") in edges  # ``from vtc import kernels`` is the submodule
    assert upward_imports(sources) == [], "the core must not import the API layer; move the code up instead"


def test_the_flops_formula_imports_no_resolution_layer():
    sources = module_sources()
    imports = imported_modules("vtc.flops", sources["vtc.flops"], set(sources))
    assert [m for m in imports if within(m, FLOPS_MUST_NOT_IMPORT)] == []


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("import vtc.api", "vtc.api"),
        ("def f():\n    from vtc.measure import flops\n    return flops", "vtc.measure"),
        ("from vtc import api", "vtc.api"),
        ("import vtc", "vtc"),
        ("from vtc import wrap", "vtc"),
        ("from .. import cli", "vtc.cli"),
        ("from ..eval.runner import run_task", "vtc.eval.runner"),
        ("import importlib\nimportlib.import_module('vtc.demo')", "vtc.demo"),
        ("if TYPE_CHECKING:\n    from vtc.api import Handle", "vtc.api"),
    ],
)
def test_an_upward_import_is_caught(source, target):
    """Each spelling of an upward import, placed in a core module, is reported."""
    sources = {**module_sources(), "vtc.methods.bad": source}
    assert upward_imports(sources) == [f"vtc.methods.bad -> {target}"]


def test_downward_and_sideways_imports_pass():
    sources = {**module_sources(), "vtc.methods.fine": "from vtc import kernels\nfrom ..flops import ModelDims"}
    assert upward_imports(sources) == []
    assert imported_modules("vtc.methods.fine", sources["vtc.methods.fine"], set(sources)) == {
        "vtc.kernels",
        "vtc.flops",
    }
