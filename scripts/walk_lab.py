"""Walk the newcomer path in a real browser: open notebooks in a running JupyterLab through its UI, Run All,
wait for the kernel, then check every cell and take screenshots.

Not a test (it needs a browser and a running Lab; no test runs it). Start Lab first (`make lab ARGS="--port
8899 --no-browser"`), then, from any Python with playwright installed (`pip install playwright`; any Chromium
works through `--chromium`, playwright's own browser download is not needed):

    python scripts/walk_lab.py --url "http://127.0.0.1:8899/lab/tree/notebooks?token=TOKEN" --shots /tmp/shots \
        01_tokenizer_adaptation.ipynb 02_predictor_finetune.ipynb 03_diagnostics.ipynb

Per notebook it opens the file from Lab's file browser (at `notebooks/`), runs Run > Run All Cells, waits until no
cell shows `[*]` and the kernel is idle, saves (Ctrl+S), and then checks each code cell in the page:
error outputs (a traceback), widgets that did not render ("Loading widget...", or the kit's no-kernel note), the
images of each figure cell (a cell that calls `save_figure`/`universe_figure`/`plot_*` must show one, except a
universe figure on a single series) and of each widget; the widgets are then poked (the window browser's
`worst close error` order, the code inspector's slider, the forecast explorer's Forecast button) and must
redraw (the explorer opens without a forecast: it must draw one when pressed). Screenshots: the page at open,
while running (every `--every` seconds), each cell with an output, each widget after the poke. Prints a line per
code cell (prompt, images, stderr outputs), the wall time of each Run All, one line per problem, and exits 1 when
a check failed. Run it from the project root (it reads the cells' sources from `--notebook-dir`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

BUSY = ".jp-InputPrompt:has-text('[*]')"
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
ERROR = "[data-mime-type='application/vnd.jupyter.error']"  # a cell's exception, as Lab renders it
FIGURE_CALL = re.compile(r"\b(save_figure|universe_figure)\(|^\s*plot_\w+\(", re.M)
WIDGET_CALL = re.compile(r"\b(window_browser|code_inspector|forecast_explorer|LiveCurve)\(")
NOT_RENDERED = ("Loading widget", "[interactive ", "Error displaying widget")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def open_from_browser(page: Page, base: str, name: str) -> None:
    """Open `notebooks/<name>` as a user does: Lab's file browser (make lab opens it at notebooks/), double-click."""
    page.goto(base)
    page.wait_for_selector(".jp-DirListing-content", timeout=120_000)
    item = page.locator(f".jp-DirListing-item[title*='{name}'], .jp-DirListing-item:has-text('{name}')").first
    item.wait_for(timeout=60_000)
    item.dblclick()
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell", timeout=120_000)
    kernel_ready(page, 180)
    news = page.locator(".Toastify__toast:has-text('Jupyter news') button:has-text('No')")
    if news.count():  # Lab's first-start question covers the lower right corner of every screenshot
        news.first.click()


def panel(page: Page):
    """The notebook panel in front (the one just opened)."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").last


def kernel_ready(page: Page, limit_s: float) -> None:
    """Until the notebook's kernel reports idle (a kernel choice dialog, if any, takes Lab's proposal)."""
    start = time.time()
    while time.time() - start < limit_s:
        dialog = page.locator(".jp-Dialog button.jp-mod-accept")
        if dialog.count():
            log("kernel dialog: accepting Lab's proposal")
            dialog.first.click()
        status = panel(page).locator(".jp-Notebook-ExecutionIndicator").first
        if status.count() and status.get_attribute("data-status") == "idle":
            return
        time.sleep(1)
    raise TimeoutError("kernel not idle")


def run_all(page: Page, stem: str, shots: Path, every: float, limit_s: float) -> float:
    """Run > Run All Cells; screenshots while it runs; returns the seconds until nothing is running."""
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    start, last_shot, k, quiet = time.time(), 0.0, 0, 0
    while time.time() - start < limit_s:
        time.sleep(2)
        status = panel(page).locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
        running = panel(page).locator(BUSY).count()
        quiet = quiet + 1 if (running == 0 and status == "idle") else 0
        if quiet >= 3:  # idle three polls in a row: Run All has finished (or stopped at an error)
            return time.time() - start - 4
        if time.time() - last_shot >= every:
            last_shot = time.time()
            cell = panel(page).locator(f".jp-CodeCell:has({BUSY})").first
            if cell.count():
                cell.scroll_into_view_if_needed()
                text = cell.locator(".jp-Cell-outputArea").inner_text()[-300:].replace("\n", " | ")
                log(f"{stem} running ({time.time() - start:.0f} s): ...{text}")
            page.screenshot(path=str(shots / f"{stem}_running_{k:02d}.png"))
            k += 1
    raise TimeoutError(f"{stem}: still running after {limit_s:.0f} s")


def image_sources(cell) -> list[str]:
    """The tails of a cell's image sources (base64 PNGs): equal lists mean the same pictures."""
    return [img.get_attribute("src")[-64:] for img in cell.locator(".jp-Cell-outputArea img").all()]


def poke_widgets(page: Page, cell, source: str, stem: str, i: int, shots: Path, problems: list[str]) -> None:
    """Make each widget redraw once and check that its image changed."""
    before = image_sources(cell)
    if "window_browser(" in source:
        info = cell.locator(".widget-html-content").first.inner_text()
        cell.locator(".widget-toggle-button:has-text('worst close error')").click()
        ok = wait_changed(lambda: cell.locator(".widget-html-content").first.inner_text(), info)
        log(f"{stem} [{i}] window browser, worst first: {cell.locator('.widget-html-content').first.inner_text()}")
    elif "code_inspector(" in source:
        info = cell.locator(".widget-html-content").first.inner_text()
        handle = cell.locator(".widget-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowRight")
        ok = wait_changed(lambda: cell.locator(".widget-html-content").first.inner_text(), info)
        log(f"{stem} [{i}] code inspector, next code: {cell.locator('.widget-html-content').first.inner_text()}")
    elif "forecast_explorer(" in source:  # one bar earlier, then the button (it opens without a forecast)
        cell.locator(".widget-slider .noUi-handle").first.focus()
        page.keyboard.press("ArrowLeft")
        cell.locator("button:has-text('Forecast')").first.click()
        ok = wait_changed(lambda: image_sources(cell), before, limit_s=600)
        log(f"{stem} [{i}] forecast explorer: {cell.locator('.widget-html-content').first.inner_text()}")
    else:
        return
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(shots / f"{stem}_cell{i:02d}_poked.png"))
    if not ok or image_sources(cell) == before:
        problems.append(f"{stem} [{i}]: the widget did not redraw when poked")


def wait_changed(read, before, limit_s: float = 120) -> bool:
    """Until ``read()`` differs from ``before`` (True), or ``limit_s`` passes (False)."""
    start = time.time()
    while time.time() - start < limit_s:
        if read() != before:
            time.sleep(1)  # let the figure that follows the text arrive
            return True
        time.sleep(0.5)
    return False


def all_cells_attached(page: Page, cells, expected: int, limit_s: float = 60) -> None:
    """Lab attaches a long notebook's cells lazily: scroll to the end and back until all are in the page."""
    outer = panel(page).locator(".jp-WindowedPanel-outer").first
    start = time.time()
    while cells.count() < expected and time.time() - start < limit_s:
        outer.evaluate("e => e.scrollTo(0, e.scrollHeight)")
        time.sleep(1)
    outer.evaluate("e => e.scrollTo(0, 0)")


def check_cells(page: Page, stem: str, sources: list[str], shots: Path, poke: bool) -> list[str]:
    """One line per code cell; the problems found."""
    problems: list[str] = []
    cells = panel(page).locator(".jp-CodeCell")
    all_cells_attached(page, cells, len(sources))
    n = cells.count()
    if n != len(sources):
        problems.append(f"{stem}: {n} code cells in the page, {len(sources)} in the file")
    for i in range(min(n, len(sources))):
        cell, source = cells.nth(i), sources[i]
        cell.scroll_into_view_if_needed()
        time.sleep(0.3)
        prompt = cell.locator(".jp-InputPrompt").first.inner_text().strip()
        out_text = cell.locator(".jp-Cell-outputArea").inner_text()
        n_img = cell.locator(".jp-Cell-outputArea img").count()
        stderr = cell.locator(STDERR).all_inner_texts()
        n_err = len(stderr)
        traceback = cell.locator(ERROR).count() > 0 or "Traceback (most recent call last)" in out_text
        first = source.strip().splitlines()[-1][:70] if source.strip() else ""
        log(f"{stem} [{i}] {prompt:6s} img={n_img} stderr={n_err} | {first}")
        if not re.fullmatch(r"\[\d+\]:", prompt):
            problems.append(f"{stem} [{i}]: not executed ({prompt!r})")
        if traceback:
            problems.append(f"{stem} [{i}]: error output: {out_text[-400:]!r}")
        elif n_err:
            log(f"   stderr: {' | '.join(t[:300] for t in stderr)}")
        for marker in NOT_RENDERED:
            if marker in out_text:
                problems.append(f"{stem} [{i}]: widget not rendered ({marker!r})")
        # a universe figure shows nothing on a single series; the forecast explorer draws when its button is pressed
        wants_image = (FIGURE_CALL.search(source) and "universe_figure" not in source) or (
            WIDGET_CALL.search(source) and "forecast_explorer(" not in source)
        if wants_image and n_img == 0:
            problems.append(f"{stem} [{i}]: a figure or widget cell shows no image")
        if out_text.strip() or n_img:
            cell.screenshot(path=str(shots / f"{stem}_cell{i:02d}.png"))
        if poke and WIDGET_CALL.search(source):
            poke_widgets(page, cell, source, stem, i, shots, problems)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="+", help="file names in notebooks/, in order")
    ap.add_argument("--url", required=True,
                    help="Lab's URL with its token, as `make lab` prints it (.../lab/tree/notebooks?token=...)")
    ap.add_argument("--shots", type=Path, required=True, help="folder for the screenshots")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    ap.add_argument("--every", type=float, default=60, help="seconds between screenshots while running")
    ap.add_argument("--limit", type=float, default=3600, help="seconds one Run All may take")
    ap.add_argument("--notebook-dir", type=Path, default=Path("notebooks"), help="where the .ipynb files are")
    ap.add_argument("--no-run", action="store_true", help="only open and check (the saved outputs)")
    ap.add_argument("--no-poke", action="store_true", help="do not touch the widgets")
    args = ap.parse_args()
    args.shots.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name in args.notebooks:
            stem = name.split("_")[0]
            nb = json.loads((args.notebook_dir / name).read_text())
            sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
            log(f"{stem}: open {name} from the file browser")
            open_from_browser(page, args.url, name)
            page.screenshot(path=str(args.shots / f"{stem}_open.png"))
            if not args.no_run:
                took = run_all(page, stem, args.shots, args.every, args.limit)
                log(f"{stem}: Run All finished in {took:.0f} s")
            found = check_cells(page, stem, sources, args.shots, poke=not args.no_poke)
            problems += found
            page.keyboard.press("Control+s")  # as a user would: the git filter keeps the outputs out of git
            time.sleep(2)
            log(f"{stem}: {len(found)} problems")
        browser.close()
    for line in problems:
        log(f"PROBLEM {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
