"""The layout holds: no import cycles, one module per outside world, small functions, a faithful fake."""

import ast
import inspect
import os

import fdbhook
from fdbhook.kernel import Kernel
from tests.fakes import FakeKernel

PKG = os.path.dirname(fdbhook.__file__)
MODULES = sorted(name[:-3] for name in os.listdir(PKG) if name.endswith(".py") and name != "__main__.py")


def _imports(name):
    """Every fdbhook module and outside package ``name`` imports, at any depth of its code."""
    tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "fdbhook":
                out.update("fdbhook.%s" % alias.name for alias in node.names)
    return out


def _graph():
    graph = {}
    for name in MODULES:
        deps = {dep.split(".")[1] for dep in _imports(name) if dep.startswith("fdbhook.")}
        graph[name] = {dep for dep in deps if dep in MODULES and dep != name}
    return graph


def test_no_import_cycles_among_fdbhook_modules():
    graph = _graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [])


def test_one_module_per_outside_world():
    users = {pkg: sorted(m for m in MODULES if any(i == pkg or i.startswith(pkg + ".") for i in _imports(m)))
             for pkg in ("pyroute2", "libvirt", "lxml")}
    assert users["pyroute2"] == ["kernel"]
    assert users["libvirt"] == ["virt"]
    assert users["lxml"] == ["domxml"]


def test_the_hook_fast_path_imports_only_the_standard_library():
    assert {dep for dep in _imports("client") if dep.startswith("fdbhook.") and dep[8:] in MODULES} == {"fdbhook.hook"}


def test_functions_stay_small():
    """No function over 60 lines unless its docstring says why (lab and demo drive whole scenarios)."""
    long = []
    for name in MODULES:
        tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > 60 and "long because" not in doc:
                    long.append("%s.%s: %d lines" % (name, node.name, length))
    assert long == []


def _public_methods(cls):
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_fake_kernel_has_exactly_the_real_adapters_methods():
    real = _public_methods(Kernel) - {"links"} | {"links"}
    fake = _public_methods(FakeKernel) - {"bridge_with_ports", "add_entry", "remove_link"}
    assert fake == real
    for name in real:
        real_args = list(inspect.signature(getattr(Kernel, name)).parameters)
        fake_args = list(inspect.signature(getattr(FakeKernel, name)).parameters)
        assert fake_args == real_args, name
