"""The package's shape: imports flow one way (errors → config → data → model → train → plan → recipe → Ray launch
→ cli),
with no circle; and no config key is accepted that no code reads."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "dolphin_train"
# Lowest first. A module may import from a lower stage or from its own; post/ and plan/ sit side by side.
STAGES = {"errors": 0, "process_group": 0, "terminal": 0, "__init__": 0, "config": 1, "data": 2, "model": 3, "train": 4,
          "post": 5, "plan": 5, "recipe": 6, "ray_launch": 7, "cli": 8, "__main__": 9}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def _imports(path: Path) -> set[str]:
    """Every dolphin_train module this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dolphin_train"):
            base = node.module.removeprefix("dolphin_train").lstrip(".")
            for alias in node.names:  # `from dolphin_train.data import packing` names a module too
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("dolphin_train.") for a in node.names if a.name.startswith("dolphin_train.")}
    return {name or "__init__" for name in found}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _stage(module: str) -> str:
    return module.split(".")[0]


def test_every_module_belongs_to_a_known_stage() -> None:
    assert {_stage(m) for m in _graph()} <= set(STAGES)


def test_imports_only_point_down_the_flow() -> None:
    upward = []
    for module, imported in _graph().items():
        for target in imported:
            same = _stage(target) == _stage(module)
            if not same and STAGES[_stage(target)] >= STAGES[_stage(module)]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


# ---- no key accepted and then ignored -----------------------------------------------------------------


def _declares_the_schema(path: Path) -> bool:
    """config/schema.py, config/keys.py and the section files under config/sections/."""
    config = PACKAGE / "config"
    return path in (config / "schema.py", config / "keys.py") or path.parent == config / "sections"


def _names_read_by_code() -> set[str]:
    """Attribute names and string constants anywhere in the package, but for the schema's field
    declarations; in the files that declare the schema only what their derived properties and checks read."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree)
        if _declares_the_schema(path):
            methods = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
            nodes = (inner for method in methods for inner in ast.walk(method))
        for node in nodes:
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def _single_choice(annotation: object) -> bool:
    """`Literal["chatml"]`: the only value accepted is the behaviour, so there is nothing to read."""
    return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


def test_every_config_key_is_read_by_some_code_or_marked_not_supported() -> None:
    from dolphin_train.config.schema import Config, DatasetConfig, LoftQSettings, PeftSettings, SpecialTokens

    read = _names_read_by_code()
    unread = []
    for model in (Config, DatasetConfig, SpecialTokens, PeftSettings, LoftQSettings):
        for name, info in model.model_fields.items():
            if (info.json_schema_extra or {}).get("unsupported") or _single_choice(info.annotation):
                continue
            if name not in read:
                unread.append(f"{model.__name__}.{info.alias or name}")
    assert unread == [], "keys no code reads: implement them or mark them unsupported=True in the schema"
