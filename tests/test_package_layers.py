"""The package's imports run one way (docs/design.md): config -> data -> models -> visualization ->
evaluation / sampling -> training -> runs -> export -> api -> cli. A module that imports a later
layer, even inside a function to dodge the cycle, is in the wrong place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "image_autoencoding"
LAYERS = [
    {"errors", "config", "config_docs", "runtime", "atomic_files", "safe_load", "disk_space"},
    {"data"},
    {"models"},
    {"visualization"},
    {"evaluation", "sampling"},
    {"training"},
    {"runs"},
    {"export", "export_onnx", "export_diffusers"},
    {"api"},
    {"cli", "__main__", "__init__"},
]


def _layer(part: str) -> int:
    (index,) = [i for i, names in enumerate(LAYERS) if part in names]
    return index


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("image_autoencoding."):
            parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "image_autoencoding":
            # A module of the package, or a name its __init__ defines (such as __version__).
            parts.update(alias.name if _is_module(alias.name) else "__init__" for alias in node.names)
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names if a.name.startswith("image_autoencoding."))
    return parts


def test_no_module_imports_a_later_layer():
    back_edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for imported in _imported_parts(path):
            if _layer(imported) > _layer(part):
                back_edges.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert back_edges == []
