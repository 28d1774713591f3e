"""The code's layout: no module reaches into another's private names, no import circle, no function
over the length cap, every program a console command and a thin script, old import paths working with
a deprecation warning; the README's layout section names every module."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement that can run: top-level and function-local alike (a lazy import that
    closes a loop is still a circle), but not those under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """``{module: modules of ours it imports}`` over moshi_ttt/ and finetune/, and the imports that name
    a module of ours that does not exist (an old path, kept only as a deprecated alias)."""
    files = {_module_name(p): p for d in PACKAGES for p in sorted((ROOT / d).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    unresolved = []
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub where there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                if t.split(".")[0] not in PACKAGES:
                    continue
                if t not in files:
                    unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t}")
                elif t != mod:
                    graph[mod].add(t)
    return graph, unresolved


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_reaches_itself_through_its_imports():
    """No import circle in moshi_ttt/ or finetune/. Function-local imports count (hiding a circle in a
    function is still a circle); ``if TYPE_CHECKING:`` imports do not (they never run). A package's
    ``__init__`` counts only when it is imported by name (``from moshi_ttt import X`` inside
    moshi_ttt is a circle through the package), not as the implicit parent of a submodule import."""
    graph, unresolved = import_graph()
    assert not unresolved, "imports of module paths that do not exist (moved?): " + "; ".join(unresolved)
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_graph_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_moshi_ttt_imports_nothing_of_finetune():
    graph, _ = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("moshi_ttt")
        for t in ts
        if t.startswith("finetune")
    )
    assert not bad, bad


# ---------------------------------------------------------------- the complexity cap

MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_the_cap():
    """Every function and method, in the packages, scripts/, train.py and tests/, is at most
    MAX_FUNCTION_LINES lines from its ``def`` to its last line (docstring included): the next long
    function is caught when it is written (CI runs this file in ``make test``)."""
    sources = _sources() + sorted((ROOT / "tests").glob("*.py"))
    long = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by step): " + "; ".join(long)


# ---------------------------------------------------------------- entry points and old import paths


def _console_scripts() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def test_every_program_is_a_console_command_and_a_thin_script():
    """pyproject.toml's console commands point at functions that exist; each has scripts/NAME.py (train:
    train.py at the root) calling that same function, and no script edits sys.path or the environment."""
    scripts = _console_scripts()
    commands = sorted(p.stem for p in (ROOT / "finetune" / "commands").glob("*.py") if p.stem != "__init__")
    assert sorted(n.removeprefix("moshi-ttt-").replace("-", "_") for n in scripts) == commands
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        stem = module.rsplit(".", 1)[1]
        thin = ROOT / ("train.py" if stem == "train" else f"scripts/{stem}.py")
        src = thin.read_text()
        assert f"from {module} import {func}" in src, thin
        assert "sys.path" not in src and "environ" not in src, thin
        assert len(src.splitlines()) <= 15, f"{thin} should only call {target}"


def _moved() -> list[tuple[str, str]]:
    from finetune import MOVED_MODULES

    return sorted(MOVED_MODULES.items()) + [
        ("moshi_ttt.gating", "moshi_ttt.inplace"),
        ("moshi_ttt.ttt_mlp", "moshi_ttt.mlp"),
    ]


@pytest.mark.parametrize("old, new", _moved())
def test_old_module_paths_import_the_new_module_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} moved to {re.escape(new)}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_old_names_resolve_with_a_deprecation_warning():
    import moshi_ttt
    from finetune.training.trainer import train
    from moshi_ttt.inplace import InPlaceTTT
    from moshi_ttt.mlp import TTTMLP
    from moshi_ttt.patch import ttt_layers

    for old, new in (("TTTGating", InPlaceTTT), ("TTTMLPGating", TTTMLP), ("ttt_gatings", ttt_layers)):
        with pytest.warns(DeprecationWarning, match=rf"moshi_ttt.{old} moved to "):
            assert getattr(moshi_ttt, old) is new
    sys.modules.pop("finetune.trainer", None)
    with pytest.warns(DeprecationWarning):
        from finetune.trainer import train as old_train
    assert old_train is train
    sys.modules.pop("moshi_ttt.gating", None)
    with pytest.warns(DeprecationWarning):
        from moshi_ttt.gating import TTTGating
    assert TTTGating is InPlaceTTT
    from finetune.data import build, manifest

    with pytest.warns(DeprecationWarning, match="finetune.data.build.resolve_assets moved to"):
        assert build.resolve_assets is manifest.resolve_assets
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        moshi_ttt.nope  # noqa: B018


def test_the_code_uses_no_old_name():
    """The aliases are for users' code: this project's own code and tests use the new names."""
    old = re.compile(
        r"\b(TTTGating|TTTMLPGating|ttt_gatings|_TTTState|_MLPState)\b|moshi_ttt\.(gating|ttt_mlp)\b"
    )
    allowed = {ROOT / "moshi_ttt" / f for f in ("__init__.py", "inplace.py", "mlp.py", "patch.py")}
    allowed.add(Path(__file__).resolve())
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _sources() + sorted((ROOT / "tests").glob("*.py"))
        if p not in allowed
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if old.search(line)
    ]
    assert not found, found


# ---------------------------------------------------------------- links and section references

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# `docs/long_context.md#choosing-eta`, `README` / `docs/x.md` followed by a quoted section:
# `docs/x.md, "Section"`, `docs/x.md ("Section")`, `docs/x.md's "Section"`.
DOC_REF = re.compile(
    r"(?<![\w/.])(README(?:\.md)?|docs/\w+\.md)(?:#([\w-]+))?(?:(?:, | \(|'s )\"([^\"]+)\")?"
)
# A path in the code's folders (a part in capitals is a placeholder: scripts/NAME.py).
CODE_PATH = re.compile(r"(?<![\w/.])((?:finetune|moshi_ttt|scripts|tests)/[\w/]+\.(?:py|sh))\b")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(path: Path) -> tuple[set[str], set[str]]:
    """(anchors, heading texts without backticks) of a markdown file, outside code blocks."""
    anchors, texts, fenced = set(), set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            text = line.lstrip("#").strip()
            anchors.add(_slug(text))
            texts.add(text.replace("`", ""))
    return anchors, texts


def _doc_path(name: str) -> Path:
    return ROOT / ("README.md" if name.startswith("README") else name)


def _problems(path: Path) -> list[str]:
    text, where, out = path.read_text(), path.relative_to(ROOT), []
    if path.suffix == ".md":
        for target in MD_LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                out.append(f"{where}: link to {target}: {file} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _headings(dest)[0]:
                out.append(f"{where}: link to {target}: no section #{anchor} in {dest.relative_to(ROOT)}")
    for name, anchor, section in DOC_REF.findall(text):
        dest = _doc_path(name)
        if not dest.is_file():
            out.append(f"{where}: {name} does not exist")
            continue
        anchors, texts = _headings(dest)
        if anchor and anchor not in anchors:
            out.append(f"{where}: {name}#{anchor}: no such section")
        if section and section.replace("`", "") not in texts:
            out.append(f'{where}: {name}, "{section}": no such section')
    for ref in CODE_PATH.findall(text):
        if not (ROOT / ref).exists() and not any(part.isupper() for part in Path(ref).with_suffix("").parts):
            out.append(f"{where}: {ref} does not exist")
    return out


def test_every_link_and_section_reference_resolves():
    """Markdown links (files and #anchors), ``docs/x.md#anchor``, ``docs/x.md, "Section"`` /
    ``README, "Section"`` references and code paths, in README.md, docs/, configs/ and the code."""
    sources = DOCS + CONFIGS + _sources()
    problems = [p for path in sources for p in _problems(path)]
    assert not problems, "\n".join(problems)


def test_the_reference_check_catches_broken_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Choosing eta\n\n```\n## not a heading\n```\n")
    good = tmp_path / "docs" / "b.md"
    good.write_text('[x](a.md#choosing-eta) and docs/a.md, "Choosing eta" and docs/a.md#choosing-eta\n')
    assert _problems(good) == []
    bad = tmp_path / "docs" / "c.md"
    bad.write_text(
        '[x](a.md#nope) [y](z.md) docs/a.md, "Not here" docs/a.md#not-a-heading docs/zz.md finetune/gone.py\n'
    )
    assert len(_problems(bad)) == 6, _problems(bad)
