"""The layers, as docs/design.md draws them, pinned rule by rule:

- the library: `guidance` (abstraction, methods, evaluators, editing algorithms) and the pipelines' core
  (`pipelines/*.py`: sampler, stages, family files, the editing mixin on the flow families only);
- training and calibration: `pipelines.training`, a library layer above the core;
- the application: `pipelines.application` (commands, batch runs, manifests, options, model names, the demo's logic),
  and `app.py` (the demo's page).

Each layer imports only those below it; the library never names a command flag; the shapes world is a fixture that
no library module but the shapes world's own reaches for; `import guidance` stays light; peft is reached through one
module.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "guidance": sorted((ROOT / "guidance").rglob("*.py")),
    "pipelines core": sorted((ROOT / "pipelines").glob("*.py")),
    "pipelines.training": sorted((ROOT / "pipelines" / "training").rglob("*.py")),
    "pipelines.application": sorted((ROOT / "pipelines" / "application").rglob("*.py")),
}
ABOVE = {  # what each layer must not import
    "guidance": ("pipelines", "app"),
    "pipelines core": ("pipelines.training", "pipelines.application", "app"),
    "pipelines.training": ("pipelines.application", "app"),
    "pipelines.application": ("app",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, anywhere in it (function bodies included), relative imports
    resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def reaches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_each_layer_imports_only_the_layers_below_it():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if reaches(m, ABOVE[layer]))
        for layer, paths in LAYERS.items()
        for path in paths
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_rule_sees_relative_imports():
    """The rule above resolves `from ..application import x`: a layer cannot hide an upward import."""
    path = ROOT / "pipelines" / "application" / "commands" / "generate.py"
    assert "pipelines.application.batch.BatchRun" in imported_modules(path)


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def string_constants(path: Path) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_the_library_names_no_command_flag():
    library = [*LAYERS["guidance"], *LAYERS["pipelines core"], *LAYERS["pipelines.training"]]
    named = {
        str(p.relative_to(ROOT)): sorted({f for s in string_constants(p) for f in FLAG.findall(s)}) for p in library
    }
    assert {path: flags for path, flags in named.items() if flags} == {}


def test_the_flag_pattern_finds_flags():
    assert FLAG.findall("use `--coefficients FOLDER` or --num-inference-steps 4, not a-b--c or x --> y") == [
        "--coefficients",
        "--num-inference-steps",
    ]


def test_the_shapes_world_is_reached_only_by_its_own_code_and_the_application():
    # the shapes world's own code, and the testing module (tiny components borrow its byte-level CLIP vocabulary)
    shapes_world = {
        ROOT / "pipelines" / "training" / "shapes.py",
        ROOT / "pipelines" / "testing.py",
        *(ROOT / "guidance" / "shapes").rglob("*.py"),
    }
    library = [*LAYERS["guidance"], *LAYERS["pipelines core"], *LAYERS["pipelines.training"]]
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if reaches(m, ("guidance.shapes",)))
        for path in library
        if path not in shapes_world
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_peft_is_reached_through_one_module():
    users = sorted(
        str(path.relative_to(ROOT))
        for paths in LAYERS.values()
        for path in paths
        if any(reaches(m, ("peft",)) for m in imported_modules(path))
    )
    assert users == ["guidance/lora.py"]


def test_import_guidance_stays_light():
    code = (
        "import sys, guidance, guidance.evaluators, guidance.shapes.world, guidance.shapes.assets, guidance.plot\n"
        "heavy = ('pipelines', 'gradio', 'open_clip', 'peft', 'matplotlib', 'accelerate')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_the_editing_mixin_is_on_the_flow_families_only():
    import pipelines

    editing = {
        name for name in pipelines.__all__ if name.endswith("Pipeline") and hasattr(getattr(pipelines, name), "edit")
    }
    assert editing == {"GuidedStableDiffusion3Pipeline", "GuidedFluxPipeline"}


def test_pyproject_installs_every_package_and_only_the_embedded_defaults_assets():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        module_name(init.parent / "__init__.py")
        for top in ("guidance", "pipelines")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == found | {"guidance_assets"}
    shipped = [p for pattern in setuptools["package-data"]["guidance_assets"] for p in (ROOT / "assets").glob(pattern)]
    assert shipped and not [p for p in shipped if p.suffix in (".png", ".jsonl", ".md", ".txt")]
    assert not [name for name in setuptools.get("py-modules", []) if name != "app"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("pipelines.application.commands.") for target in scripts.values())
    assert "guided-train-shapes" not in scripts  # the shapes world's training is a development command
