"""The package's shape: the public API at the top level, no module named like a function, and
imports that point downward only (no cycle among the package's modules, lazy imports included)."""
import ast
import importlib
import pkgutil
from pathlib import Path

import spectral_kernels as sk

ROOT = Path(sk.__file__).resolve().parent

PUBLIC_FUNCTIONS = ("adapt", "save_adapter", "load_adapter", "merge_adapter", "unmerge", "unload",
                    "print_trainable_parameters", "save_pretrained", "from_pretrained", "export_peft", "save_merged")


def test_peft_shaped_api_at_the_top_level():
    for name in PUBLIC_FUNCTIONS:
        assert callable(getattr(sk, name)), name
        assert getattr(sk, name).__module__.startswith("spectral_kernels.tuning"), name
    assert isinstance(sk.SpectralConfig(target_modules=["q"]), sk.SpectralConfig)


def _modules() -> list[str]:
    names = ["spectral_kernels"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="spectral_kernels."):
        names.append(info.name)
    return names


def test_no_module_shares_a_name_with_a_function_it_exports():
    """`sk.tuning.fingerprint` must be the function, `import spectral_kernels.tuning.x as m` a module."""
    for name in _modules():
        parent, _, leaf = name.rpartition(".")
        if not parent:
            continue
        package = importlib.import_module(parent)
        exported = getattr(package, "__all__", [])
        assert leaf not in exported, f"{parent} exports {leaf!r}, which is also the module {name}"


def _imports(path: Path, package: str) -> set[str]:
    """spectral_kernels modules imported anywhere in the file (module level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("spectral_kernels"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("spectral_kernels"))
    return out


def test_imports_point_downward_only():
    modules = {}
    for name in _modules():
        rel = name.split(".")[1:]
        path = ROOT.joinpath(*rel).with_suffix(".py")
        if not path.exists():
            path = ROOT.joinpath(*rel, "__init__.py")
        if not path.exists():
            continue  # the compiled extension
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        modules[name] = path, package
    graph = {}
    for name, (path, package) in modules.items():
        if path.name == "__init__.py":
            continue  # packages re-export what is below them
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name
                       and modules[m][0].name != "__init__.py"}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
