"""The docs' pictures of the demo: the Compare tab after the AG preset's comparison (`demo-compare.png`) and the Edit
tab after a FlowOpt edit of a shapes-world scene (`demo-edit.png`), each taken in headless Chromium.

    python docs/screenshots.py docs/figures [--chromium /usr/bin/chromium]

Needs the `demo` extra and Playwright (`pip install playwright`; the browser is the system's Chromium).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

import app
from guidance.shapes.assets import ASSETS
from guidance.shapes.world import ShapesWorld
from pipelines.application.demo import PRESETS

SCENE = dict(color="red", shape="circle", size="large", position="center", background="white")
TIMEOUT_MS = 120_000


def compare_preset(page: Page, path: Path) -> None:
    """The first preset loaded and compared."""
    page.get_by_label("preset (the docs' comparisons)").click()
    page.get_by_role("option", name=next(iter(PRESETS))).click()
    page.get_by_role("button", name="Load preset").click()
    expect(page.get_by_label("policy 4: method")).to_have_value("LinearAG")  # the preset is in the page
    page.locator("#compare-button").click()
    expect(page.locator("#compare-summary")).to_contain_text("Cheapest", timeout=TIMEOUT_MS)
    page.screenshot(path=path, full_page=True)


def edit_scene(page: Page, image: Path, path: Path) -> None:
    """`image` uploaded into the Edit tab and edited with its first settings."""
    page.get_by_role("tab", name="Edit").click()
    page.locator("#upload input[type=file]").set_input_files(str(image))
    expect(page.locator("#source-image img")).to_be_visible(timeout=30_000)
    page.locator("#edit-button").click()
    expect(page.locator("#edit-status")).to_contain_text("kept iteration", timeout=TIMEOUT_MS)
    page.screenshot(path=path, full_page=True)


def save_screenshots(folder: str | Path, chromium: str) -> list[Path]:
    """Serves the demo locally (a free port), takes both pictures into `folder` and returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "demo-compare.png", folder / "demo-edit.png"]
    world = ShapesWorld.from_json(ASSETS / "shapes-world.json")
    page_server, url = app.launch_demo(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
            image = Path(scratch) / "source.png"
            world.render_images([world.scene(**SCENE)])[0].save(image)
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            compare_preset(page, paths[0])
            edit_scene(page, image, paths[1])
            browser.close()
    finally:
        page_server.close()
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write demo-compare.png and demo-edit.png, e.g. docs/figures")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    arguments = parser.parse_args(argv)
    paths = save_screenshots(arguments.folder, arguments.chromium)
    print(*paths, sep="\n")
    return paths


if __name__ == "__main__":
    main()
