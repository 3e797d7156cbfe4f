"""The package's shape (docs/design.md): no import cycle, the quarantined bench/ and experiment/ are never
imported by the core, and every module stays under 400 lines. Imports inside functions count too."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blade")
QUARANTINED = ("blade.bench", "blade.experiment")


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """The blade modules `module` imports (`from blade.x import y` counts blade.x.y if it is a module)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("blade"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            if not base.startswith("blade"):
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) - {"blade"} for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_never_imports_the_quarantined_packages():
    for m, deps in _graph().items():
        if m.startswith(QUARANTINED) or m == "blade.cli":  # the CLI dispatches to every subcommand
            continue
        assert not [d for d in deps if d.startswith(QUARANTINED)], f"{m} imports {deps}"


def test_modules_stay_under_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(open(p).read().splitlines())) > 400}
    assert not long, f"split these modules: {long}"
