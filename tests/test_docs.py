"""The docs are real code. Every ```python block of README.md and docs/*.md runs here, offline, in a folder of its
own, and prints what its `# prints: ...` comments say (in order); a block that shows a real checkpoint is marked
```python no-run and must at least compile. Every command of a ```bash block parses with the command's own argument
parser; every link and figure resolves; the README stays a front door (size, the two commands, CI's test command
last); the measurement tables live in benchmarks/results/ only. Some examples' claims are checked further below."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
    ROOT / "assets" / "README.md",
]
LANGUAGES = {"python", "bash", "text", "jsonl", "mermaid"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
PRINTS = re.compile(r"#\s*prints:\s*(.*?)\s*$", re.M)
README_LIMIT = 12_000


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    info: str
    source: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runs(self) -> bool:
        return self.language == "python" and "no-run" not in self.info.split()[1:]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(path, text[: match.start()].count("\n") + 1, match.group(1).strip(), match.group(2))
        for match in FENCE.finditer(text)
    ]


BLOCKS = [block for path in DOCS for block in blocks_of(path)]
RUNNABLE = [block for block in BLOCKS if block.runs]


def run_block(block: Block, folder: Path) -> tuple[dict, str]:
    """Execute a block in a fresh namespace with `folder` as the working directory: (its globals, what it printed)."""
    namespace: dict = {"__name__": "__docs__"}
    printed = io.StringIO()
    previous = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block.source, block.id, "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace, printed.getvalue()


@dataclass
class Ran:
    namespace: dict
    printed: str
    folder: Path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """`ran(block)`: the block run once per test module, in a temporary folder of its own."""
    results: dict[str, Ran] = {}

    def run(block: Block) -> Ran:
        if block.id not in results:
            folder = tmp_path_factory.mktemp(re.sub(r"\W+", "-", block.id))
            results[block.id] = Ran(*run_block(block, folder), folder)
        return results[block.id]

    return run


def block_with(marker: str) -> Block:
    """The one runnable block containing `marker`."""
    found = [block for block in RUNNABLE if marker in block.source]
    assert len(found) == 1, f"{len(found)} runnable blocks contain {marker!r}: {[b.id for b in found]}"
    return found[0]


# ----- every block


def test_every_fence_names_its_language_and_python_is_run_or_marked():
    unnamed = [block.id for block in BLOCKS if block.language not in LANGUAGES]
    assert unnamed == [], f"fences need one of {sorted(LANGUAGES)} (```python no-run for examples that cannot run)"
    marks = {block.id: block.info for block in BLOCKS if block.language == "python" and block.info != "python"}
    assert all(info == "python no-run" for info in marks.values()), marks
    assert len(RUNNABLE) >= 15  # the docs are mostly runnable examples


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "python" and not b.runs], ids=lambda b: b.id)
def test_a_no_run_block_compiles(block):
    compile(block.source, block.id, "exec")


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_a_python_block_runs_and_prints_what_it_says(block, ran):
    printed = ran(block).printed.splitlines()
    expected = PRINTS.findall(block.source)
    position = 0
    for text in expected:  # in order, each an exact line of the output
        assert text in printed[position:], f"{block.id} should print {text!r}; it printed {printed}"
        position = printed.index(text, position) + 1


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "jsonl"], ids=lambda b: b.id)
def test_a_jsonl_block_holds_one_object_per_line(block):
    assert all(isinstance(json.loads(line), dict) for line in block.source.splitlines() if line.strip())


# ----- commands


def console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def shell_commands(source: str) -> list[list[str]]:
    """Every simple command of a shell block (continuations joined; split at &&, ||, ; and |), as words."""
    commands = []
    for line in source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command:
                commands.append(command)
            command = []
    return commands


def project_command(words: list[str]) -> tuple[str | None, list[str]]:
    """What a project command runs (a console script's module, `-m pipelines...`, `-m benchmarks...`, or a script
    such as `app.py`) and its arguments, else (None, [])."""
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment assignments
    scripts = console_scripts()
    name = Path(words[0]).name if words else ""
    if name in scripts:
        return scripts[name], words[1:]
    if name.startswith("python") and len(words) > 1 and words[1].endswith(".py"):  # python app.py --flag
        return words[1], words[2:]
    if "-m" in words and name in ("python", "python3", "python3.11", "accelerate", "torchrun"):
        at = words.index("-m")
        if words[at + 1].startswith(("pipelines.", "benchmarks.")):
            return words[at + 1], words[at + 2 :]
    return None, []


def check_command(words: list[str], where: str) -> None:
    """A project command's flags exist: parsed by the command's own parser, or (scripts and benchmarks, whose parsers
    are built inside `main`) named in its source."""
    module, arguments = project_command(words)
    if module is None:
        return
    if module.endswith(".py") or module.startswith("benchmarks."):
        source = (ROOT / (module if module.endswith(".py") else module.replace(".", "/") + ".py")).read_text()
        unknown = [flag for flag in arguments if flag.startswith("--") and f'"{flag}"' not in source]
        assert unknown == [], f"{where}: `{shlex.join(words)}`: {module} has no {unknown}"
        return
    parser = importlib.import_module(module).build_parser()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            parser.parse_args(arguments)
        except SystemExit as stop:
            assert stop.code == 0, f"{where}: `{shlex.join(words)}` does not parse: {errors.getvalue().strip()}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "bash"], ids=lambda b: b.id)
def test_a_shell_block_names_real_commands_and_flags(block):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for words in shell_commands(block.source):
        for requirement in (w for w in words if w.startswith(".[")):  # pip install -e ".[demo]"
            assert set(requirement[2:-1].split(",")) <= set(extras), f"{block.id}: unknown extra {requirement}"
        check_command(words, block.id)


def test_the_asset_table_commands_parse():
    """assets/README.md names the command that writes every file, in its table."""
    text = (ROOT / "assets" / "README.md").read_text()
    commands = [span for span in re.findall(r"`([^`]+)`", text) if span.startswith(("guided-", "python -m "))]
    assert len(commands) >= 8
    for command in commands:
        check_command(shlex.split(command), f"assets/README.md `{command}`")


# ----- the pages


def links_of(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return re.findall(r"\]\(([^)\s]+)\)", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_figure_resolves(path):
    for link in links_of(path):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.relative_to(ROOT)} links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", FENCE.sub("", file.read_text()), re.M)
            assert anchor in {slug(h) for h in headings}, f"{path.relative_to(ROOT)}: no heading for {link}"


def test_every_figure_and_page_is_reachable():
    linked = {(path.parent / link.partition("#")[0]).resolve() for path in DOCS for link in links_of(path)}
    figures = sorted((ROOT / "docs" / "figures").glob("*.png"))
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert [p.name for p in [*figures, *pages] if p.resolve() not in linked] == []


def test_the_readme_is_a_front_door_with_the_two_commands():
    text = README.read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md has {len(text.encode())} bytes"
    shell = [block.source.strip() for block in blocks_of(README) if block.language == "bash"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    generate = (
        "python3.11 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/guided-generate --model shapes:sd "
        '--prompt "a large red circle at the center on white" --prompt "a small green triangle at the left on black" '
        "--output-dir outputs"
    )
    assert shell[-2:] == [generate, ci]  # each in a block of its own, the test command last
    assert text.rstrip().splitlines()[-2:] == [ci, "```"]  # CI's test command is the README's last command
    quickstart = next(block for block in blocks_of(README) if block.language == "python")
    assert quickstart.runs and len(quickstart.source.splitlines()) <= 15


def test_no_page_speaks_of_who_or_what_was_lent():
    for path in DOCS:
        assert not re.search(r"\blent\b|no GPU was|earlier session", path.read_text()), path


def test_measurement_tables_live_in_the_results_files_only():
    rows = {
        line
        for results in (ROOT / "benchmarks" / "results").glob("*.md")
        for line in results.read_text().splitlines()
        if line.startswith("| ") and re.search(r"\d\.\d", line)
    }
    copied = {str(p.relative_to(ROOT)): [line for line in p.read_text().splitlines() if line in rows] for p in DOCS}
    assert {path: lines for path, lines in copied.items() if lines} == {}


# ----- what the examples claim, beyond what they print


def shapes_attribute(image, attribute: str) -> str:
    """The attribute the shapes-world scorer reads in a PIL image."""
    from guidance.shapes.assets import load_scorer, load_world

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    world, logits = load_world(), load_scorer()(pixels)
    return world.values[attribute][int(logits[attribute].argmax())]


def test_the_stages_example_runs_again_and_edits(ran):
    example = ran(block_with("pipe.prepare(")).namespace
    assert torch.equal(example["again"].latents, example["result"].latents)
    edited = example["pipe"].decode(example["edited"].latents, example["target"], output_type="pil").images[0]
    assert shapes_attribute(edited, "color") == "blue"  # the target prompt's colour
    assert shapes_attribute(edited, "shape") == "circle"  # the source image's shape


def test_the_configuration_example_saves_and_loads(ran):
    result = ran(block_with('save_pretrained("my-policy")'))
    saved = json.loads((result.folder / "my-policy" / "guidance_config.json").read_text())
    assert saved["_class_name"] == "AdaptiveGuidance" and saved["threshold"] == 0.999
    assert json.loads((result.folder / "my-dynamic" / "guidance_config.json").read_text())["evaluators"] == [
        "latent-clip"
    ]


def test_the_composition_example_composes(ran):
    example = ran(block_with("same_thing = ")).namespace
    assert example["dynamic_in_interval"].config.start == 0.2
    assert example["negative_model"].unconditional.model is example["other_unet"]


def test_the_dynamic_example_chooses_among_its_candidates(ran):
    example = ran(block_with("DynamicGuidance(candidates=(5, 7.5, 10, 15)")).namespace
    scales = example["out"].trace.scales
    assert {row[0] for row in scales} <= {5.0, 7.5, 10.0, 15.0}
    assert example["out"].trace.extras[0]["lookahead"] == "next_latent"
    assert example["pixel"].lookahead_kind == "x0"


def test_the_flowopt_example_edits_and_inverts(ran):
    result = ran(block_with("edited = pipe.edit("))
    example = result.namespace
    edited, again, source = example["edited"], example["again"], example["source"]
    assert shapes_attribute(source, "color") == "red" and shapes_attribute(edited.images[0], "color") == "blue"
    assert len(edited.iterates) == len(edited.residuals) == 3
    pixels = [np.asarray(image, dtype=np.float64) / 255 for image in (again, source)]
    assert 10 * np.log10(1 / ((pixels[0] - pixels[1]) ** 2).mean()) > 25  # the inverted noise regenerates it
    assert example["with_ag"].nfe < edited.nfe
    assert shapes_attribute(example["flowedit"].images[0], "color") == "blue"
    assert (result.folder / "blue.png").is_file()


def test_the_batch_example_writes_a_run_that_resumes(ran):
    block = block_with("result = generate_batch(")
    result = ran(block)
    batch = result.namespace["result"]
    assert (batch.generated, batch.resumed) == (3, 0)
    assert sorted(p.name for p in (result.folder / "outputs" / "batch").glob("*.png")) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    assert 20 < batch.nfe_per_image < 40  # AG: CFG until the predictions agree
    again = run_block(block, result.folder)[0]["result"]
    assert (again.generated, again.resumed) == (0, 3)


def test_the_npo_example_keeps_the_adapter_off_the_conditional_rows(ran):
    from guidance.lora import active_adapters, lora_layers

    example = ran(block_with("npo = load_npo_adapter(pipe")).namespace
    assert example["with_ag"].trace.nfe < example["out"].trace.nfe
    assert all(active_adapters(layer) == [] for layer in lora_layers(example["pipe"].unet))
