"""The layers: `guidance` (abstraction, methods, evaluators) imports neither the pipelines nor heavy optional packages;
the pipelines import guidance; commands sit above both. And the package list installs every package."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_guidance_stays_light():
    code = (
        "import sys, guidance, guidance.evaluators, guidance.shapes.world, guidance.shapes.assets, guidance.plot\n"
        "heavy = ('pipelines', 'gradio', 'open_clip', 'peft', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, anywhere in it (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_of_guidance_imports_the_pipelines_or_the_commands():
    above = ("pipelines", "app")
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in above)
        for path in (ROOT / "guidance").rglob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_pipelines_core_does_not_import_the_commands():
    core = [p for p in (ROOT / "pipelines").glob("*.py")]
    offenders = {p.name: sorted(m for m in imported_modules(p) if m.startswith("pipelines.application.commands")) for p in core}
    relative = {p.name for p in core if "from .commands" in p.read_text()}
    assert {k: v for k, v in offenders.items() if v} == {} and relative == set()


def test_pyproject_installs_every_package():
    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    listed = {name.strip().strip('"') for name in line.split(",")}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("guidance", "pipelines")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"guidance_assets"} == listed
