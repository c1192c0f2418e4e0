"""One headless Chromium page on the session's ComfyUI server (tests/harness/server.py), for the
browser tests.

The page opens once per module: one app start for all the checks. Without Chromium or the
playwright package the tests fail, never skip, naming scripts/setup_browser.sh. Screenshots go
to ``$BROWSER_SHOTS_DIR`` when it is set, else to the session's pytest temp folder; the end of
the run lists them, and the frontend's own console errors (not the pack's: reported, not failed).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.browser import Console, FrontendCheckError, browser_problem, close_dialogs, launch, open_app, store_settings

VIEWPORT = {"width": 1600, "height": 900}
STEP_TIMEOUT_MS = 30_000  # any single wait in the page (a click, a selector, a condition)
TEST_CHECKPOINT = "sd15_small"
REPORT = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def browser_report(request) -> dict:
    """What the end-of-run summary lists: screenshot paths, and frontend errors not from the pack."""
    report = {"shots": [], "noise": {}}
    request.config.stash[REPORT] = report
    return report


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("BROWSER_SHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("browser_shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def server_checkpoint(comfy_server, checkpoints) -> str:
    """The random-weight SD1.5 checkpoint in the server's models/checkpoints, linked before the
    page opens so that the frontend lists it."""
    checkpoints[TEST_CHECKPOINT]  # built on first use
    return comfy_server.add_checkpoint(checkpoints.path(TEST_CHECKPOINT))


@pytest.fixture(scope="session")
def browser_installed() -> None:
    """Fails at once, before a server starts, when Chromium or playwright is missing."""
    problem = browser_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="module")
def frontend(browser_installed, comfy_server, server_checkpoint, browser_report):
    """``(page, console)``: the frontend open on the server, the pack's extension loaded."""
    from playwright.sync_api import sync_playwright

    store_settings(comfy_server)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(STEP_TIMEOUT_MS)
            console = Console(page, comfy_server.url)
            try:
                open_app(page, comfy_server.url, console)
            except FrontendCheckError as error:
                pytest.fail(str(error), pytrace=False)
            yield page, console
            pack = set(console.pack_errors())
            browser_report["noise"].update(dict.fromkeys(e for e in console.errors() if e not in pack))
        finally:
            browser.close()


@pytest.fixture(autouse=True)
def no_dialog_left_open(frontend):
    """Each test starts, and leaves the page, with no dialog open (a failed test may leave one)."""
    close_dialogs(frontend[0])
    yield
    close_dialogs(frontend[0])


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash.get(REPORT, None)
    if not report or not (report["shots"] or report["noise"]):
        return
    terminalreporter.section("browser")
    for path in report["shots"]:
        terminalreporter.write_line(f"screenshot: {path}")
    for error in report["noise"]:
        terminalreporter.write_line(f"frontend error, not the pack's (reported, not failed): {error.splitlines()[0]}")
