"""The demo in a real browser: headless Chromium (Debian's, `apt-get install chromium`) driven by Playwright from
PyPI. Each state is saved as a screenshot under `test-output/browser/` (or `$BROWSER_SCREENSHOTS`).

Skipped, with the reason printed, only where no Chromium can be found (`.ci/run` installs it when missing)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import policy_values
from PIL import Image

from pipelines.application import demo
from pipelines.application.demo import CompareRequest

app = pytest.importorskip("app", reason="the demo's page needs gradio (pip install -e '.[demo]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect
PROMPT = "a large red circle at the center on white"
SCREENSHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS") or Path(__file__).parents[2] / "test-output" / "browser")


def chromium() -> str | None:
    candidates = (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium found: `apt-get install chromium`, or set CHROMIUM to a Chromium executable")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(demo_url)
    expect(page.locator("#compare-button")).to_be_visible(timeout=30_000)
    yield page
    context.close()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def choose(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def wait_until_done(page, elem_id: str) -> None:
    """The run showing its progress on `elem_id` has ended: Gradio does not take a click of it before (trigger mode
    "once"), even when its last results are already drawn."""
    expect(page.locator(f"#{elem_id} .wrap.hide")).to_have_count(1, timeout=30_000)


def gallery_images(page, elem_id: str) -> list[Image.Image]:
    sources = [img.get_attribute("src") for img in page.locator(f"#{elem_id} img").all()]
    return [Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB") for src in sources]


def test_load_compare_and_see_images_plots_costs_and_progress(page):
    shot(page, "01-loaded")
    page.get_by_label("steps", exact=True).fill("40")
    page.get_by_label("images per policy").fill("3")
    page.locator("#compare-button").click()
    progress = page.locator("#compare-summary").get_by_role("progressbar", name=re.compile(r"policy \d: step \d+.40$"))
    expect(progress).to_be_visible(timeout=30_000)  # gr.Progress: the policy and its step
    shot(page, "02-compare-in-progress")
    expect(page.locator("#compare-summary")).to_contain_text("Cheapest: policy 2", timeout=60_000)
    for k in (1, 2):
        expect(page.locator(f"#images-{k} img")).to_have_count(3)
        expect(page.locator(f"#plot-{k} img")).to_have_count(1)
    expect(page.locator("#cost-1")).to_contain_text("CFG 7.5: 80 NFEs per image")
    expect(page.locator("#compare-summary tr")).to_have_count(3)  # a table: the header and a row per policy
    expect(page.locator("#compare-summary tr").nth(2)).to_contain_text("AG 7.5 (threshold 0.995)")
    shot(page, "03-compared")


def test_stop_a_comparison_then_a_failed_run_clears_the_last_results(page):
    page.locator("#compare-stop-button").click()
    expect(page.locator("#compare-stopping")).to_have_text("nothing is running")
    page.get_by_label("steps", exact=True).fill("100")
    page.get_by_label("images per policy").fill("8")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-summary").get_by_role("progressbar")).to_be_visible(timeout=30_000)
    expect(page.locator("#compare-stopping")).to_have_text("")  # the last Stop's note is gone with the new run
    page.locator("#compare-button").click()  # a second click while it runs is not taken (it would clear its results)
    page.locator("#compare-stop-button").click()
    expect(page.locator("#compare-summary")).to_contain_text("Stopped by you during policy", timeout=60_000)
    expect(page.locator("#compare-stopping")).to_have_text("stopping after the current step...")
    expect(page.locator("#images-2 img")).to_have_count(0)  # policy 2 never finished
    shot(page, "04-compare-stopped")
    wait_until_done(page, "compare-summary")
    page.get_by_label("steps", exact=True).fill("4")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-summary")).to_contain_text("4 steps on cpu", timeout=60_000)
    expect(page.locator("#images-1 img")).to_have_count(8)
    expect(page.locator("#compare-stopping")).to_have_text("")
    wait_until_done(page, "compare-summary")
    page.locator("#policy-1").get_by_label("guidance scale", exact=True).fill("45")
    page.locator("#compare-button").click()
    expect(page.locator(".toast-body").filter(has_text="policy 1: guidance scale must be")).to_be_visible()
    expect(page.locator("#images-1 img")).to_have_count(0)  # the last run's results are not left beside the error
    expect(page.locator("#compare-summary")).not_to_contain_text("Cheapest")
    shot(page, "04-compare-error-cleared")


def test_changing_the_method_changes_the_controls(page):
    slot = page.locator("#policy-1")
    expect(slot.get_by_label("AG threshold")).to_be_hidden()
    for method, shown, hidden in [
        ("ag", ["guidance scale", "AG threshold"], ["candidate scales", "final guidance scale"]),
        ("dynamic", ["candidate scales", "CLIP on decoded pixels"], ["guidance scale", "AG threshold"]),
        ("scheduled", ["guidance scale", "final guidance scale", "schedule"], ["candidate scales"]),
        ("linear-ag", ["LinearAG coefficients folder (empty: shipped)"], ["final guidance scale"]),
        ("none", [], ["guidance scale", "Self-NPO in the unconditional branch"]),
    ]:
        choose(page, "policy 1: method", {value: label for label, value in app.METHOD_CHOICES}[method])
        for label in shown:
            expect(slot.get_by_label(label, exact=True)).to_be_visible()
        for label in hidden:
            expect(slot.get_by_label(label, exact=True)).to_be_hidden()
        shot(page, f"04-method-{method}")
    page.get_by_label("preset (the docs' comparisons)").click()
    page.get_by_role("option", name=re.compile("^Self-NPO in the unconditional branch")).click()
    page.get_by_role("button", name="Load preset").click()
    expect(page.locator("#policy-2").get_by_label("Self-NPO in the unconditional branch")).to_be_checked()
    shot(page, "05-preset-self-npo")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt", "", "prompt must not be empty"),
        ("guidance scale", "45", "policy 1: guidance scale must be in [0, 30], got 45"),
        ("steps", "0", "steps must be in [1, 100], got 0"),
        (
            "model (a shapes model, or a local diffusers folder)",
            "/no/such/model",
            "model '/no/such/model' is neither a shipped shapes model",
        ),
    ],
)
def test_bad_values_show_a_readable_error(page, field, value, message):
    box = (
        page.locator("#policy-1").get_by_label(field, exact=True)
        if field == "guidance scale"
        else page.get_by_label(field, exact=True)
    )
    box.fill(value)
    box.press("Enter" if field.startswith("model") else "Tab")
    page.locator("#compare-button").click()
    expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    shot(page, f"06-error-{field.split()[0]}")


def open_edit_tab(page, image: Path, iterations: int) -> None:
    page.get_by_role("tab", name="Edit").click()
    page.locator("#upload input[type=file]").set_input_files(str(image))
    expect(page.locator("#source-image img")).to_be_visible(timeout=30_000)
    page.get_by_label("iterations", exact=True).fill(str(iterations))


def test_an_edit_shows_its_iterates_one_by_one(page, red_circle_png):
    open_edit_tab(page, red_circle_png, iterations=12)
    page.locator("#edit-button").click()
    counts, started = [], time.monotonic()
    while time.monotonic() - started < 120:
        counts.append(page.locator("#iterates img").count())
        if counts[-1] >= 4 > max(counts[:-1], default=0):  # once, on the way
            shot(page, "07-edit-in-progress")
        if "all iterations done" in page.locator("#edit-status").inner_text():
            break
        time.sleep(0.02)
    counts.append(page.locator("#iterates img").count())
    seen = sorted(set(counts))
    # one at a time (the exact order is checked through the API); the page may draw two updates at once
    assert seen[-1] == 13 and len(seen) >= 5, f"iterates did not arrive one by one: counts seen {seen}"
    expect(page.locator("#edit-status")).to_contain_text("kept iteration")
    expect(page.locator("#residuals img")).to_have_count(1)
    shot(page, "08-edit-done")


def test_stop_keeps_the_best_so_far(page, red_circle_png):
    # Invert, as it runs all 50 iterations on this image (the edit converges at iteration 14: a race with Stop)
    open_edit_tab(page, red_circle_png, iterations=50)
    page.get_by_label(demo.EDIT_MODES[3], exact=True).check()
    expect(page.get_by_label("target prompt (not used by Invert)")).to_be_hidden()  # the mode's settings are in
    page.get_by_label("iterations", exact=True).fill("50")
    page.locator("#edit-button").click()
    # at least 2 iterates: the page may draw two updates at once
    expect(page.locator("#iterates img").nth(1)).to_be_attached(timeout=60_000)
    page.locator("#stop-button").click()
    expect(page.locator("#edit-status")).to_contain_text("stopped by you at iteration", timeout=60_000)
    assert page.locator("#iterates img").count() < 51
    expect(page.locator("#edit-result img")).to_be_visible()
    shot(page, "09-edit-stopped")


def test_another_edit_model_loads_its_settings(page):
    page.get_by_role("tab", name="Edit").click()
    expect(page.get_by_label("n_max", exact=True)).to_have_value("15")  # chosen for shapes:sd3
    box = page.get_by_label("flow model (shapes:sd3 or a local SD3/Flux folder)")
    box.fill("tiny:sd3")
    box.press("Enter")
    expect(page.get_by_label("n_max", exact=True)).to_have_value("12")  # the FlowOpt paper's code, for SD3
    expect(page.get_by_label("step size (a number or auto)")).to_have_value("0.01")
    expect(page.locator(".toast-body")).to_have_count(0)


def test_a_file_that_is_not_an_image_is_refused_and_another_can_follow(page, tmp_path, red_circle_png):
    page.get_by_role("tab", name="Edit").click()
    (tmp_path / "notes.txt").write_text("not an image")
    page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
    expect(page.locator(".toast-body").filter(has_text="'notes.txt' is not an image")).to_be_visible(timeout=30_000)
    shot(page, "10-error-upload")
    page.locator("#upload input[type=file]").set_input_files(str(red_circle_png))  # at once: the box was emptied
    expect(page.locator("#source-image img")).to_be_visible(timeout=30_000)


def test_two_sessions_at_once_each_get_their_own_results(browser, demo_url):
    sessions = {"a": (PROMPT, 0), "b": ("a small blue square at the top on black", 7)}
    pages = {}
    for key, (prompt, seed) in sessions.items():
        pages[key] = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        pages[key].goto(demo_url)
        expect(pages[key].locator("#compare-button")).to_be_visible(timeout=30_000)
        pages[key].get_by_label("prompt", exact=True).fill(prompt)
        pages[key].get_by_label("steps", exact=True).fill("100")  # long enough that one is still under way
        pages[key].get_by_label("seed (image k uses seed + k)").fill(str(seed))
    for page in pages.values():
        page.locator("#compare-button").click()
    expect(pages["b"].locator("#compare-summary").get_by_role("progressbar")).to_be_visible(timeout=30_000)
    assert "Cheapest" not in pages["a"].locator("#compare-summary").inner_text()  # both runs are under way at once
    for key, page in pages.items():
        expect(page.locator("#compare-summary")).to_contain_text("Cheapest", timeout=60_000)
        shot(page, f"11-session-{key}")
    for key, (prompt, seed) in sessions.items():
        slots = policy_values(demo.PolicyControls("cfg", 7.5), demo.PolicyControls("ag", 7.5))
        alone = list(demo.compare(CompareRequest.from_page(prompt, "", "shapes:sd", 100, 2, seed, "", slots)))[-1]
        shown = gallery_images(pages[key], "images-1") + gallery_images(pages[key], "images-2")
        assert [list(i.getdata()) for i in shown] == [list(i.getdata()) for i in alone[0] + alone[3]]
    for page in pages.values():
        page.context.close()
