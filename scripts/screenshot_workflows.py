"""Load the shipped example workflows in ComfyUI's real frontend and save a picture of each graph.

    python scripts/screenshot_workflows.py                 # both workflows -> docs/workflow_*.png
    python scripts/screenshot_workflows.py --output-dir /tmp/shots "workflows/Consistent Story - Comic page (SD1.5).json"

A real ComfyUI server (tests/harness/server.py: ``main.py --cpu`` on 127.0.0.1, throwaway base
directory, this pack linked into custom_nodes) serves the frontend; headless Debian Chromium,
driven by Playwright, opens it, loads each workflow with ``app.loadGraphData`` and fails when:
a node type is not registered in LiteGraph (the "missing nodes" case), the frontend logs an
error while loading or while loading this pack's web extension, the extension
``ConsistentStory.PanelCount`` is absent, or the Story Prompts node's badge does not read the
panel and character counts that the pack's own parser (nodes/story/story_prompts.py) finds.
The graph is then fitted to the view and the page saved as ``workflow_<name>.png``
("Consistent Story - Comic page (SD1.5).json" -> ``workflow_comic_page_sd1_5.png``): a 1600x900 page at pixel ratio 2, so the
3200x1800 PNG keeps node text legible although the whole graph fits at about 45 % zoom; it is
stored with a palette of 256 colours (a screenshot has few), which keeps it under 400 KB.

The checkpoint each workflow names is given an empty stand-in file in the server's
models/checkpoints, so the picture shows the graph as a user with that model sees it: frontend
1.58 marks a node whose model file is missing and says so in a toast over the graph.

Needs, besides the project's environment (ComfyUI and its requirements), Debian's Chromium and
the playwright driver (never `playwright install`): ``bash scripts/setup_browser.sh``. The checks
and the browser settings are tests/harness/browser.py's, shared with the browser tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT / "tests", REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import comfy_host
from harness.browser import (
    CHROMIUM, EXTENSION_NAME, Console, FrontendCheckError, browser_problem, check_graph, fit_view, launch, open_app,
    store_settings,
)
from harness.server import ComfyServer
from harness.workflow import workflow_id

DEFAULT_WORKFLOWS = [REPO_ROOT / "workflows" / f"Consistent Story - {title}.json"
                     for title in ("Comic page (SD1.5)", "Four-panel strip (SDXL)")]

# Loads one workflow as a file dropped on the canvas would be (the tests go through the template
# browser instead). Missing models are expected: no weights ship with the pack.
LOAD_JS = """
async ([graph, name]) => {
  await app.loadGraphData(graph, true, true, name, { showMissingModelsDialog: false });
}
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", type=Path, default=DEFAULT_WORKFLOWS, help="UI-format workflow JSON files")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "docs", help="where PNGs go (default: %(default)s)")
    parser.add_argument("--chromium", default=CHROMIUM, help="browser executable (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--pixel-ratio", type=float, default=2.0, help="device pixels per CSS pixel (default: %(default)s)")
    parser.add_argument("--zoom", type=float, default=0.88, help="share of the view the graph fills (default: %(default)s; "
                        "frontend 1.58 draws its sidebar and top bar over the graph's view)")
    return parser.parse_args(argv)


def picture_name(workflow: Path) -> str:
    """"Consistent Story - Comic page (SD1.5).json" -> ``workflow_comic_page_sd1_5.png``."""
    return f"workflow_{workflow_id(workflow)}.png"


def stand_in_checkpoints(server: ComfyServer, workflows: list[Path]) -> None:
    """An empty file in the server's models/checkpoints for each checkpoint the workflows name
    (the server lists it; nothing loads it)."""
    for workflow in workflows:
        for node in json.loads(workflow.read_text())["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                (server.base / "models" / "checkpoints" / node["widgets_values"][0]).touch()


def save_small(picture: Path) -> None:
    """Re-save the screenshot with a palette of its 256 main colours."""
    from PIL import Image

    with Image.open(picture) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(picture, optimize=True)


def check_and_shoot(page, workflow: Path, picture: Path, console: Console, zoom: float) -> dict:
    """Load ``workflow``, check it, fit it to the view and save ``picture``; return a summary."""
    graph = json.loads(workflow.read_text())
    since = console.mark()
    page.evaluate(LOAD_JS, [graph, workflow.stem])
    summary = check_graph(page, graph, workflow.name, console, since)
    summary["scale"] = round(fit_view(page, zoom), 3)
    page.screenshot(path=str(picture))
    save_small(picture)
    return {**summary, "picture": picture, "kib": picture.stat().st_size / 1024}


def run(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    comfy_dir = comfy_host.find_comfyui()
    if comfy_dir is None:
        raise SystemExit(comfy_host.missing_message())
    problem = browser_problem(args.chromium)
    if problem:
        raise SystemExit(problem)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="consistent_story_shots_") as base:
        server = ComfyServer(comfy_dir, Path(base)).start()
        try:
            store_settings(server)
            stand_in_checkpoints(server, args.workflows)
            print(f"ComfyUI on {server.url} (started in {server.start_seconds:.1f} s)")
            with sync_playwright() as playwright:
                browser = launch(playwright, args.chromium)
                try:
                    other_errors: dict[str, None] = {}
                    for workflow in args.workflows:
                        # A fresh page (and browser context) per workflow: one open tab per picture.
                        viewport = {"width": args.width, "height": args.height}
                        page = browser.new_page(viewport=viewport, device_scale_factor=args.pixel_ratio)
                        console = Console(page, server.url)
                        open_app(page, server.url, console)
                        summary = check_and_shoot(page, workflow, args.output_dir / picture_name(workflow), console, args.zoom)
                        print(f"{workflow.name}: {summary['nodes']} nodes, {summary['links']} links, extension "
                              f"{EXTENSION_NAME} loaded, badge {summary['badge']!r}, scale {summary['scale']} -> "
                              f"{summary['picture']} ({summary['kib']:.0f} KiB)")  # fmt: skip
                        for warning in summary["warnings"]:
                            print(f"  frontend warning: {warning}")
                        other_errors.update(dict.fromkeys(console.errors()))
                        page.context.close()
                    for error in other_errors:
                        print(f"frontend error outside the workflow loads: {error.splitlines()[0]}")
                finally:
                    browser.close()
        finally:
            server.stop()
    print(f"done in {time.monotonic() - began:.1f} s")


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except FrontendCheckError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
