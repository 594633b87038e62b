"""The house stays in order: each room named in the README, the core apart
from the plugins, files that fit in a head, and types that check."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tightwad_core.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "tightwad_core"
PLUGINS = ROOT / "plugins"


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout"):].split("\n## ", 1)[0]


def test_readme_layout_names_every_room() -> None:
    layout = _layout()
    rooms = [p.parent for p in sorted(CORE.glob("*/__init__.py")) + sorted(PLUGINS.glob("*/__init__.py"))]
    assert rooms
    for room in rooms:
        assert f"`{room.name}/`" in layout, f"the README's layout section does not name {room}"
    for module in sorted(CORE.glob("*.py")):
        if module.name != "__init__.py":
            assert f"`{module.name}`" in layout, f"the README's layout section does not name {module}"


def test_core_has_few_top_level_modules() -> None:
    modules = [p for p in CORE.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 8, sorted(p.name for p in modules)


def test_no_file_over_500_lines() -> None:
    for path in sorted(CORE.rglob("*.py")) + sorted(PLUGINS.rglob("*.py")):
        lines = path.read_text().count("\n")
        assert lines <= 500, f"{path.relative_to(ROOT)} has {lines} lines: split it along its seams"


def _strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


#: Where the core may spell a plugin's name, and why.
ALLOWED = {
    ("config/schema.py", "direct"),  # the mode a profile gets when it names none
    ("http/openai.py", "openai"),  # the blueprint's name
    ("http/ollama.py", "ollama"),  # the blueprint's name
    ("bench/run.py", "llama-server"),  # the stock coordinator of the pool-alone side
    ("bench/run.py", "emulated"),  # --link-delay sets the links of a pool's emulated workers
    ("config/schema.py", "tcp"),  # the transport a cluster worker gets when it names none
    ("config/schema.py", "memory-proportional"),  # the placement a cluster gets by default
    ("moe/plan.py", "gate"),  # a MoE projection's name (ffn_gate_exps), not the gate mode
}


def test_core_knows_plugins_only_through_hooks() -> None:
    reg = load_registry()
    names = {n for kind in ("backends", "modes", "verifiers", "transports", "placement_strategies")
             for n in reg.names(kind)}
    assert {"llama-server", "worker", "direct", "speculative", "prefix-batch", "tcp",
            "tls-token", "memory-proportional"} <= names
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m.startswith("tightwad_plugins") for m in mods), \
                    f"tightwad_core/{rel}:{node.lineno} imports a plugin"
        if rel.startswith("runtime/"):
            continue  # builds and runs the llama.cpp binaries, whose names these are
        for const in _strings(tree):
            if const.value in names:
                assert (rel, const.value) in ALLOWED, \
                    f"tightwad_core/{rel}:{const.lineno} hard-codes the plugin name {const.value!r}"


def test_mypy_is_clean(tmp_path: Path) -> None:
    """mypy on the core and the plugins, with plugins/ laid out under its import
    name (`tightwad_plugins`), the way the package installs it."""
    (tmp_path / "tightwad_core").symlink_to(CORE)
    (tmp_path / "tightwad_plugins").symlink_to(PLUGINS)
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "mypy", "-p", "tightwad_core", "-p", "tightwad_plugins",
           "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / ".mypy")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
