"""Dependencies point one way, down the pipeline: no import cycle between trt_twotower's
modules, and no stage imports a later one (imports inside functions count too).

The graph is read from the source with ``ast``, so a lazy import that would only close a cycle
at run time is caught as well."""

import ast
from pathlib import Path

import trt_twotower

PACKAGE = Path(trt_twotower.__file__).parent

# Each stage may import only stages listed after it (architecture: cli → serve → runtime →
# engine → export → reference → the bottom modules).
LAYERS = ["cli", "serve", "train", "runtime", "engine", "export", "manifest", "reference"]
# What a stage must never import, by pipeline order.
FORBIDDEN = {LAYERS[i]: set(LAYERS[:i]) for i in range(len(LAYERS))}


def _module(path: Path) -> str:
    parts = ["trt_twotower", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a list of modules, or [] (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node: str) -> list[str]:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = "black"
        return []

    for node in sorted(graph):
        if node not in colour:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "trt_twotower.runtime.trt_executor" in graph
    assert find_cycle(graph) == []


def test_no_stage_imports_a_later_one():
    wrong = sorted(f"{module} imports {target}"
                   for module, targets in import_graph().items()
                   for target in targets
                   if _stage(target) in FORBIDDEN.get(_stage(module), set()))
    assert wrong == []
