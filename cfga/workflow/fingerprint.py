"""Code fingerprints: a rerun trigger (rule ``params``) for outputs that depend on cfga code.

A fingerprint is the sha256 of the syntax trees, without docstrings, of the cfga modules a
rule's script imports, followed transitively through every cfga import (lazy ones inside
functions included). Comments, docstrings, formatting and ``__version__`` do not count; any
change to what runs does. The module set is derived from the imports, so a module that
extraction starts to use is covered without anyone listing it.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import cfga

# The package the workflow imported (beside the Snakefile, else the installed one).
CFGA_DIR = Path(cfga.__file__).resolve().parent
ROOT = "cfga"


def module_file(name: str, root: Path = CFGA_DIR) -> Path | None:
    """The source file of cfga module or package ``name`` under ``root``, or None if there is none."""
    parts = name.split(".")
    if parts[0] != ROOT:
        return None
    base = root.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _absolute(node: ast.ImportFrom, module: str | None, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    if module is None:
        return None  # a relative import in a script: not cfga
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, module: str | None = None, is_package: bool = False,
                     top_level_only: bool = False, root: Path = CFGA_DIR) -> set[str]:
    """cfga modules ``tree`` imports by name: ``import m``, ``from m import x`` (``m.x`` when that is
    a module, else ``m``, whose attribute ``x`` is). Parent packages are not listed.

    ``module``: the tree's own dotted name, for relative imports. ``top_level_only``: only the
    imports that run when the module is imported (not those inside functions or classes).
    """
    nodes = tree.body if top_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == ROOT)
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node, module, is_package)
            if mod is None or mod.split(".")[0] != ROOT:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if module_file(sub, root) else mod)
    return out


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# Modules a package imports by a computed name (importlib), which the import scan cannot see:
# cfga.backbones.family_module loads the family modules.
DYNAMIC_IMPORTS: dict[str, tuple[str, ...]] = {
    "cfga.backbones": ("cfga.backbones.resnet", "cfga.backbones.swin", "cfga.backbones.vit"),
}


def module_closure(entries: Iterable[str], exclude: Iterable[str] = (), root: Path = CFGA_DIR) -> list[str]:
    """Every cfga module importing ``entries`` runs, sorted: their imports, transitively.

    A module imported by name is followed through all its imports, lazy ones included; its parent
    packages (imported implicitly) only through their module-level imports. Modules in
    ``exclude`` (and what only they import) are left out.
    """
    exclude = set(exclude)
    seen: dict[str, bool] = {}  # module → followed through all imports (not only top-level)
    todo = [(m, True) for m in entries]
    while todo:
        name, full = todo.pop()
        if name in exclude or seen.get(name) is True or (name in seen and not full):
            continue
        path = module_file(name, root)
        if path is None:
            continue  # `from cfga import load_model`: an attribute, found through cfga/__init__.py
        seen[name] = full
        tree = _parse(path)
        deps = imported_modules(tree, name, path.name == "__init__.py", top_level_only=not full, root=root)
        deps |= set(DYNAMIC_IMPORTS.get(name, ())) if full else set()
        todo += [(d, True) for d in deps]
        todo += [(p, False) for p in _parents(name)]
    return sorted(seen)


def script_imports(script: str | os.PathLike, root: Path = CFGA_DIR) -> set[str]:
    """cfga modules a rule's script imports."""
    return imported_modules(_parse(Path(script)), root=root)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _is_version(stmt: ast.stmt) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == "__version__" for t in targets)


def code_tree(source: str, filename: str = "<cfga>") -> str:
    """The code of a module as text: its syntax tree without docstrings and ``__version__``."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = [s for s in node.body if not _is_version(s)] if isinstance(node, ast.Module) else node.body
            if body and _is_docstring(body[0]):
                body = body[1:]
            node.body = body or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_fingerprint(modules: Iterable[str], extra=None, root: Path = CFGA_DIR) -> str:
    """sha256 of the code of cfga ``modules`` (dotted names) and of JSON-able ``extra``."""
    h = hashlib.sha256()
    for name in sorted(modules):
        path = module_file(name, root)
        if path is None:
            raise ValueError(f"no cfga module {name!r} under {root}")
        h.update(f"{name}\0{code_tree(path.read_text(encoding='utf-8'), str(path))}\0".encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def scripts_fingerprint(scripts: Iterable[str | os.PathLike], exclude: Iterable[str] = (), extra=None,
                        root: Path = CFGA_DIR) -> str:
    """Fingerprint of the cfga code rule scripts run: :func:`module_closure` of their imports."""
    entries = set().union(*(script_imports(s, root) for s in scripts))
    return code_fingerprint(module_closure(entries, exclude, root), extra, root)


# Of the feature registry, extraction reads only names, dimensions and the CFGA layers: these
# facts stand in for the module, so renaming a table column does not re-extract.
FEATURE_REGISTRY = "cfga.registry.features"


def extraction_facts() -> dict:
    from cfga.registry.archs import ARCH_INFO, FAMILY_PROTOCOLS
    from cfga.registry.features import CFGA_LAYERS, PROTOCOL_FEATURES, feature_dim, features_for

    return {
        "cfga_layers": [list(x) for x in CFGA_LAYERS],
        "features": {p: [[f, feature_dim(f, p)] for f in fs] for p, fs in PROTOCOL_FEATURES.items()},
        "transformer_features": {
            a.name: {p: [[f, feature_dim(f, p, a.name)] for f in features_for(p, a.name)]
                     for p in FAMILY_PROTOCOLS[a.family]}
            for a in ARCH_INFO.values() if a.family != "resnet"
        },
    }


def extraction_modules(scripts: Iterable[str | os.PathLike], root: Path = CFGA_DIR) -> list[str]:
    """The cfga modules a feature file depends on (the registry's feature facts aside)."""
    entries = set().union(*(script_imports(s, root) for s in scripts))
    return module_closure(entries, exclude=[FEATURE_REGISTRY], root=root)


def extraction_fingerprint(scripts: Iterable[str | os.PathLike], root: Path = CFGA_DIR) -> str:
    """Rerun trigger of the extraction rules (``scripts``: their scripts)."""
    return code_fingerprint(extraction_modules(scripts, root), extraction_facts(), root)


def tables_fingerprint(scripts: Iterable[str | os.PathLike], root: Path = CFGA_DIR) -> str:
    """Rerun trigger of the tables rule (``scripts``: its script)."""
    return scripts_fingerprint(scripts, root=root)
