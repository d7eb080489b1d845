"""The layers stay visible: imports only point downward, and no module imports itself back through others.

core ``flopwise`` (no vLLM) <- adapter ``flopwise_vllm`` <- user surfaces ``flopwise_serve`` <-
``flopwise_bench``. Every import counts, module-level or inside a function.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "flopwise": ROOT / "src",
    "flopwise_vllm": ROOT / "plugins",
    "flopwise_serve": ROOT / "serving",
    "flopwise_bench": ROOT / "bench",
}
LAYER = {"flopwise": 0, "flopwise_vllm": 1, "flopwise_serve": 2, "flopwise_bench": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in sorted((base / pkg).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            while n and n not in known:  # `from pkg import module` names the module; else its package
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_point_downward_and_the_core_never_imports_vllm():
    wrong = []
    for name, path in _modules().items():
        top = name.split(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for m in mods:
                other = m.split(".")[0]
                if other in LAYER and LAYER[other] > LAYER[top]:
                    wrong.append(f"{name} imports {m}")
                if top == "flopwise" and other == "vllm":
                    wrong.append(f"{name} (core) imports {m}")
    assert not wrong, wrong


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # A package importing its own submodules (its __init__ re-exporting them) is not a circle of modules.
    cycles = [
        c
        for c in cycles
        if not all(c[0] == m or m.startswith(c[0] + ".") for m in c)
        and not all(c[-2] == m or m.startswith(c[-2] + ".") for m in c)
    ]
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_adapter_and_serving_modules_stay_small():
    big = {}
    for name, path in _modules().items():
        if name.split(".")[0] in ("flopwise_vllm", "flopwise_serve"):
            lines = len(path.read_text().splitlines())
            if lines > 300:
                big[name] = lines
    assert not big, big
