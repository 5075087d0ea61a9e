"""A regular (non-editable) install finds the shipped shapes world; `GUIDANCE_ASSETS` overrides where it is."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guidance.shapes import assets

ROOT = Path(__file__).resolve().parent.parent


def test_a_regular_install_runs_the_command_line_on_the_embedded_default(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop(assets.ASSETS_ENV, None)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import guidance; from guidance.shapes.assets import ASSETS; print(guidance.__file__); print(ASSETS)",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where  # the installed copy, not the checkout
    done = subprocess.run(
        [
            sys.executable,
            str(target / "bin" / "guided-generate"),
            "--model",
            "shapes:sd",
            "--prompt",
            "a large red circle at the center",
            "--num-inference-steps",
            "4",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "00000.png").is_file() and "NFE per image: 8 (4 steps)" in done.stdout
    assert "pip install accelerate" not in done.stderr


def test_guidance_assets_points_at_another_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=rf"\$GUIDANCE_ASSETS='{tmp_path}' is not a shapes-world assets folder"
    ):
        assets.assets_root()
    copy = tmp_path / "assets"
    copy.mkdir()
    shutil.copy(ROOT / "assets" / "shapes-world.json", copy)
    monkeypatch.setenv(assets.ASSETS_ENV, str(copy))
    assert assets.ASSETS == copy and assets.load_world().caption(assets.load_world().heldout_scenes()[0])
    with pytest.raises(FileNotFoundError, match="shapes-scorer/config.json' is missing; rebuild it with"):
        assets.load_scorer()
