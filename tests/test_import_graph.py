"""The package's import graph: no circles and no upward imports (DESIGN.md, "Second iteration", property 7).

Every `import` statement of every module of `hf_galore` is read from the source (module level and inside
functions; `if TYPE_CHECKING:` blocks excluded, they never run), resolved to the module it names, and checked
against the layers below. Deprecation aliases resolve old names lazily by string (`hf_galore/utils/deprecation.py`)
and are not import statements, which is the point of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "hf_galore"

#: Layers, lowest first: a module may import only modules of its own layer or below.
LAYERS: list[tuple[str, ...]] = [
    ("hf_galore.errors", "hf_galore.utils"),
    ("hf_galore.configs", "hf_galore.projection"),
    ("hf_galore.modules", "hf_galore.optim"),
    ("hf_galore.registry", "hf_galore.targeting"),
    ("hf_galore.builder", "hf_galore.loading"),
    ("hf_galore.methods",),
    ("hf_galore.memory", "hf_galore.integrations"),
    (
        "hf_galore.cli",
        "hf_galore.examples",
        "hf_galore",
    ),  # the command line, the demo helpers, and the package's __init__ (the public API; the CLI reads
    # its __version__): the top, which nothing below imports
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif not (isinstance(node, ast.If) and _is_type_checking(node)):
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `hf_galore` modules that the import statements of module `name` name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            # `from pkg import sub` names the submodule when there is one, else an attribute of pkg.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        found.update(t for t in targets if t == "hf_galore" or t.startswith("hf_galore."))
    return found


def layer_of(name: str) -> int:
    if name == "hf_galore":
        return len(LAYERS) - 1
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "hf_galore"):
            return index
    raise AssertionError(f"module {name} is in no layer of LAYERS; add it")


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph.get(root, ()))))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_the_graph_reader_sees_imports():
    """Guard for the checks below: the reader finds known edges, so an empty graph cannot pass them."""
    graph = import_graph()
    assert "hf_galore.registry" in graph["hf_galore.methods.galore.spec"]
    assert "hf_galore.optim.base" in graph["hf_galore.optim.adamw"]
    assert "hf_galore.methods.welore" in graph["hf_galore.integrations.callbacks"]  # an import inside a method
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_imports():
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_below_the_methods_imports_a_method_and_nothing_imports_the_cli():
    graph = import_graph()
    methods = layer_of("hf_galore.methods")
    for source, targets in graph.items():
        if layer_of(source) < methods:
            assert not [t for t in targets if t.startswith("hf_galore.methods")], source
        assert "hf_galore.cli" not in targets, f"{source} imports the CLI"


def test_engines_never_import_transformers():
    for name, path in all_modules().items():
        if name.startswith(("hf_galore.optim", "hf_galore.projection", "hf_galore.registry", "hf_galore.configs")):
            tree = ast.parse(path.read_text())
            names = {
                alias.name if isinstance(node, ast.Import) else node.module
                for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
                for alias in node.names
            }
            assert not [n for n in names if n and n.split(".")[0] == "transformers"], name


def test_the_torch_only_layers_import_without_transformers():
    """`hf_galore.modules`, the engines, the methods' optimizers and the projection math run without transformers
    (blocked in a fresh interpreter: importing it raises)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['accelerate'] = None\n"
        "import torch\n"
        "import hf_galore.modules, hf_galore.optim, hf_galore.projection.spectrum\n"
        "from hf_galore.methods.galore.optimizer import GaLoreAdamW\n"
        "from hf_galore.methods.flora.optimizer import FloraAdamW\n"
        "from hf_galore.builder import make_optimizer_kwargs\n"
        "model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4))\n"
        "cls, kw = make_optimizer_kwargs('galore_adamw', model, lr=1e-3, weight_decay=0.0,\n"
        "                               target_modules='all-linear', optim_args='rank=2')\n"
        "assert cls is GaLoreAdamW, cls  # the names are registered without transformers too\n"
        "w = torch.nn.Parameter(torch.randn(8, 6)); w.grad = torch.randn(8, 6)\n"
        "GaLoreAdamW([{'params': [w], 'low_rank': True}], rank=2).step()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_modules_are_imported_by_name_only_in_the_alias_machinery_and_the_package_init():
    """`importlib.import_module("hf_galore...")` would be an import the graph above cannot see."""
    allowed = {"hf_galore.utils.deprecation", "hf_galore"}
    offenders = []
    for name, path in all_modules().items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith(("hf_galore", "."))
            ):
                offenders.append(f"{name}: import_module({node.args[0].value!r})")
    assert not offenders, offenders
