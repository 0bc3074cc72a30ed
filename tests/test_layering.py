"""Package layering (docs/architecture.md, "Layers"): every `jaxhack` import points to a lower layer
or to the same package, there is no import cycle, no module is over ~500 lines, and no script
imports another script."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxhack"
MAX_LINES = 520

# lowest first; a module may import modules of its own layer entry or of earlier ones
LAYERS = [
    ("jaxhack.io", "jaxhack.configfile", "jaxhack.tokenizer", "jaxhack.models.config", "jaxhack.parallel",
     "jaxhack.profiling", "jaxhack.tracking"),
    ("jaxhack.checkpoint", "jaxhack.env"),
    ("jaxhack.models",),
    ("jaxhack.grads",),
    ("jaxhack.projection",),
    ("jaxhack.rl.sampling", "jaxhack.rl.lend", "jaxhack.rl.refill", "jaxhack.rl.sampler"),
    ("jaxhack.probes", "jaxhack.rl"),
    ("jaxhack.bench", "jaxhack.demo", "jaxhack.organism", "jaxhack.phase3_floor"),
    ("jaxhack.commands", "jaxhack.cli"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module}: in no layer of tests/test_layering.py"
    return best


def imports(path: Path) -> set[str]:
    """Every jaxhack module imported anywhere in the file (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jaxhack")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxhack"):
            for a in node.names:  # `from jaxhack.x import y` may name a submodule y
                sub = f"{node.module}.{a.name}"
                out.add(sub if _exists(sub) else node.module)
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (REPO / rel).with_suffix(".py").is_file() or (REPO / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_upward_import():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = {m: {d for d in deps if d in graph_keys} for graph_keys in [set(graph())] for m, deps in graph().items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d == m or (m.startswith(d + ".") and d.count(".") < m.count(".")):
                continue  # a package __init__ re-exporting its own submodules
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_module_sizes():
    big = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_no_script_imports_another_script():
    scripts = {p.stem for p in (REPO / "scripts").glob("*.py")}
    bad = []
    for p in (REPO / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{p.name} imports {n}" for n in names if n.split(".")[0] in scripts | {"scripts"}]
    assert not bad, bad
