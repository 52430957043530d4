"""The house's rules, read from the code with ast: the product never imports the research package, no module
reaches into another's private names, and no class or function grows past a page or two."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PRODUCT, RESEARCH = "edgemoe_llamacpp", "edgemoe_bench"
OURS = (PRODUCT, RESEARCH)
CLASS_LINES, FUNCTION_LINES = 200, 60


def modules(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out += [(n.lineno, n.module)] + [(n.lineno, f"{n.module}.{a.name}") for a in n.names]
    return out


def test_the_product_never_imports_the_research_package():
    found = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in modules(PRODUCT)
             for line, name in imported(ast.parse(p.read_text())) if name.split(".")[0] == RESEARCH]
    assert found == []


def test_no_module_uses_another_modules_private_names():
    """`from ours import _name`, or `module._name` on a module of ours imported by name."""
    found = []
    for p in modules(*OURS, "tools"):
        tree = ast.parse(p.read_text())
        ours: set[str] = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                ours |= {(a.asname or a.name.split(".")[0]) for a in n.names if a.name.split(".")[0] in OURS}
            elif isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in OURS:
                for a in n.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{p.relative_to(ROOT)}:{n.lineno}: from {n.module} import {a.name}")
                    ours.add(a.asname or a.name)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ours \
                    and n.attr.startswith("_") and not n.attr.startswith("__"):
                found.append(f"{p.relative_to(ROOT)}:{n.lineno}: {n.value.id}.{n.attr}")
    assert found == []


def sizes() -> dict[str, list[tuple[str, int, int]]]:
    """name -> [(where, lines, limit)] of every class and function of the packages over its limit."""
    out: dict[str, list] = {}
    for p in modules(*OURS):
        tree = ast.parse(p.read_text())
        for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            for f in cls.body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    f.qualname = f"{cls.name}.{f.name}"
        for n in ast.walk(tree):
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = CLASS_LINES if isinstance(n, ast.ClassDef) else FUNCTION_LINES
                lines = n.end_lineno - n.lineno + 1
                if lines > limit:
                    name = getattr(n, "qualname", n.name)
                    out.setdefault(name, []).append((f"{p.relative_to(ROOT)}:{n.lineno}", lines, limit))
    return out


def test_no_class_or_function_grows_past_its_limit():
    over = sizes()
    assert over == {}, f"over {CLASS_LINES} lines a class or {FUNCTION_LINES} a function: {over}"
