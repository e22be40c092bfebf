"""The import graph stays visible (issue 20): no import circle between tasks/ modules, counting the imports a module
runs when it loads (its top level, `TYPE_CHECKING` blocks aside; `from tasks.training import X` as the submodule that
defines X, see `_LAZY` there); and an import of the project's own code inside a function says why it is there (a
comment before it in that function: what it keeps out of start-up). Reads the sources with `ast`, imports nothing."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _lazy_names() -> dict[tuple[str, str], str]:
    """(package, name) -> the submodule a package's `__getattr__` loads for it (a `_LAZY = {submodule: names}`)."""
    out = {}
    for pkg, tree in TREES.items():
        if MODULES[pkg].name != "__init__.py":
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_LAZY"]:
                for sub, names in ast.literal_eval(node.value).items():
                    out.update({(pkg, n): f"{pkg}.{sub}" for n in names})
    return out


LAZY = _lazy_names()


def _load_time_imports(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _load_time_imports(node.body)
            yield from _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _load_time_imports(block)
        elif isinstance(node, ast.With):
            yield from _load_time_imports(node.body)


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project modules an import statement loads (with the packages above them)."""
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".")
            if MODULES[module].name != "__init__.py":
                here = here[:-1]
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
        names = {base}
        for a in node.names:
            names.add(f"{base}.{a.name}")
            if (base, a.name) in LAZY:
                names.add(LAZY[(base, a.name)])
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return {t for t in out if t in MODULES and t != module and t not in own_packages}


def graph(prefix: str = "tasks") -> dict[str, set[str]]:
    return {m: {t for node in _load_time_imports(TREES[m].body) for t in _targets(node, m) if t.startswith(prefix)}
            for m in MODULES if m.startswith(prefix)}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == v:
                            break
                    if len(scc) > 1:
                        out.append(sorted(scc))
    return out


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_top_level_and_lazy_imports():
    edges = graph()
    assert "tasks.common" in edges["tasks.base_model"]
    assert "tasks.training.core" in edges["tasks.distributed.__main__"]  # `from tasks.training import train`


def test_no_import_circle_between_tasks_modules():
    assert circles(graph()) == []


def test_in_function_project_imports_say_why():
    missing = []
    for m, tree in TREES.items():
        lines = MODULES[m].read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and n is not fn
                     and any(t.split(".")[0] in PACKAGES for t in _targets(n, m))]
            if not inner:
                continue
            first = min(inner, key=lambda n: n.lineno)
            if not any("#" in line for line in lines[fn.lineno:first.end_lineno]):
                missing.append(f"{MODULES[m].relative_to(ROOT)}:{first.lineno} ({fn.name})")
    assert not missing, "project imports inside a function without a comment saying why: " + ", ".join(missing)
