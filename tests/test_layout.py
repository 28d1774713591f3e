"""The code's layout: no module reaches into another's private names; the README's layout section
names every module."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moshi_ttt", "finetune")


def _sources() -> list[Path]:
    return [p for d in (*PACKAGES, "scripts") for p in sorted((ROOT / d).rglob("*.py"))] + [ROOT / "train.py"]


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        aliases = {}  # `import finetune.training.trainer as T` -> T
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                ours = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {a.name}"
                    for a in node.names
                    if ours and a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif isinstance(node, ast.Import):
                aliases.update(
                    {a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, "private names used outside their module: " + ", ".join(found)


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", layout))
    modules = [p for d in (*PACKAGES, "scripts") for p in (ROOT / d).rglob("*.py") if p.stem != "__init__"]
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if p.stem not in words)
    assert not missing, f"the README's layout section does not name {missing}"
