"""Load the shipped example workflows in ComfyUI's real frontend and save a picture of each graph.

    python scripts/screenshot_workflows.py                 # both workflows -> docs/workflow_*.png
    python scripts/screenshot_workflows.py --output-dir /tmp/shots workflows/comic_sd15.json

A real ComfyUI server (tests/harness/server.py: ``main.py --cpu`` on 127.0.0.1, throwaway base
directory, this pack linked into custom_nodes) serves the frontend; headless Debian Chromium,
driven by Playwright, opens it, loads each workflow with ``app.loadGraphData`` and fails when:
a node type is not registered in LiteGraph (the "missing nodes" case), the frontend logs an
error while loading or while loading this pack's web extension, the extension
``ConsistentStory.PanelCount`` is absent, or the Story Prompts node's badge does not read the
panel and character counts that the pack's own parser (nodes/story_prompts.py) finds.
The graph is then fitted to the view and the page saved as ``workflow_<name>.png``
(``comic_sd15.json`` -> ``workflow_sd15.png``): a 1600x900 page at pixel ratio 2, so the
3200x1800 PNG keeps node text legible although the whole graph fits at about 45 % zoom.

Needs, besides the project's environment (ComfyUI and its requirements):

    apt-get install -y chromium          # Debian's browser, /usr/bin/chromium
    pip install playwright               # the Python driver only; never `playwright install`

(To keep the project's venv untouched: ``pip install --target /tmp/shot/pylib playwright`` and
run with ``PYTHONPATH=/tmp/shot/pylib .venv/bin/python scripts/screenshot_workflows.py``.)

Playwright's own browser download is never used: Chromium is started from ``--chromium``.
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
from harness.pack import load_pack
from harness.server import ComfyServer

DEFAULT_WORKFLOWS = [REPO_ROOT / "workflows" / "comic_sd15.json", REPO_ROOT / "workflows" / "comic_sdxl.json"]
EXTENSION_NAME = "ConsistentStory.PanelCount"
EXTENSION_SCRIPT = "consistent_story.js"
STORY_NODE = "ConsistentStoryPrompts"
# Flags from the machine notes: no GPU, no network beyond loopback, no first-run chores.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Settings stored on the server before the page opens: no first-run panel, minimap or render
# statistics over the graph, and full-detail nodes (titles, widget values) at any zoom.
PICTURE_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}
READY_TIMEOUT_MS = 120_000
SETTLE_S = 1.5

READY_JS = "() => !!(window.app && window.app.canvas && window.LiteGraph && window.comfyAPI)"

# Loads one workflow and reports what the frontend made of it. Missing models are expected
# (no weights ship with the pack), so that dialog is suppressed; the missing-nodes one is not.
LOAD_JS = """
async ([graph, name]) => {
  await app.loadGraphData(graph, true, true, name, { showMissingModelsDialog: false });
  const registered = LiteGraph.registered_node_types;
  return {
    types: app.graph.nodes.map((n) => n.type),
    unregistered: graph.nodes.map((n) => n.type).filter((t) => !(t in registered)),
    links: Object.keys(app.graph.links ?? {}).length,
  };
}
"""

# The extension draws its badge in onDrawForeground: draw the node once into a spare canvas
# and keep every string it writes.
BADGE_JS = """
(nodeType) => {
  const node = app.graph.nodes.find((n) => n.type === nodeType);
  if (!node) return { error: `no ${nodeType} node in the graph` };
  const ctx = document.createElement("canvas").getContext("2d");
  const texts = [];
  const fillText = ctx.fillText.bind(ctx);
  ctx.fillText = (text, ...rest) => { texts.push(String(text)); fillText(text, ...rest); };
  node.onDrawForeground?.(ctx, app.canvas, app.canvas.canvas);
  const story = node.widgets?.find((w) => w.name === "story");
  return { texts, story: story?.value ?? null };
}
"""

# Fit every node (title bar included) into the canvas, leaving a margin.
FIT_JS = """
(zoom) => {
  const rects = app.graph.nodes.map((n) => n.boundingRect);
  const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
  const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom });
  app.canvas.setDirty(true, true);
  return app.canvas.ds.scale;
}
"""

OPEN_DIALOGS_JS = """
() => [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
  .filter((d) => d.offsetParent !== null)
  .map((d) => d.innerText.trim().slice(0, 300))
"""


class WorkflowCheckError(RuntimeError):
    """The frontend did not load a workflow or the pack's extension cleanly."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", type=Path, default=DEFAULT_WORKFLOWS, help="UI-format workflow JSON files")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "docs", help="where PNGs go (default: %(default)s)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--pixel-ratio", type=float, default=2.0, help="device pixels per CSS pixel (default: %(default)s)")
    parser.add_argument("--zoom", type=float, default=0.95, help="share of the view the graph fills (default: %(default)s)")
    return parser.parse_args(argv)


def picture_name(workflow: Path) -> str:
    """``comic_sd15.json`` -> ``workflow_sd15.png``."""
    return f"workflow_{workflow.stem.removeprefix('comic_')}.png"


def expected_badge(story_text: str) -> str:
    """The badge text for ``story_text`` according to the pack's Python parser (the authority)."""
    load_pack()
    from consistent_story.nodes.story_prompts import parse_story

    story = parse_story(story_text)
    panels, characters = len(story.panels), len(story.characters)
    lonely = [c.name for c in story.characters if not any(p.characters == (c.name,) for p in story.panels)]
    warning = f" · {', '.join(f'[{name}]' for name in lonely)} never alone" if lonely else ""
    return f"{panels} panel{'' if panels == 1 else 's'} · {characters} character{'' if characters == 1 else 's'}{warning}"


class Console:
    """Every console message and uncaught page error, in order, with a mark for 'since when'."""

    def __init__(self, page):
        self.entries: list[tuple[str, str]] = []
        page.on("console", lambda msg: self.entries.append((msg.type, f"{msg.text} @ {msg.location.get('url', '')}")))
        page.on("pageerror", lambda error: self.entries.append(("pageerror", error.stack or str(error))))

    def mark(self) -> int:
        return len(self.entries)

    def errors(self, since: int = 0) -> list[str]:
        return [text for kind, text in self.entries[since:] if kind in ("error", "pageerror")]

    def warnings(self, since: int = 0) -> list[str]:
        return [text for kind, text in self.entries[since:] if kind == "warning"]


def open_app(page, url: str, console: Console) -> None:
    """Open the frontend, wait until ``app`` is ready, and check the pack's extension loaded."""
    page.goto(url + "/", wait_until="domcontentloaded")
    page.wait_for_function(READY_JS, timeout=READY_TIMEOUT_MS)
    time.sleep(SETTLE_S)  # restorePreviousWorkflow and first-run panels run after `app` appears
    page.keyboard.press("Escape")
    names = page.evaluate("() => app.extensions.map((e) => e.name)")
    if EXTENSION_NAME not in names:
        raise WorkflowCheckError(f"extension {EXTENSION_NAME} not registered; the frontend has: {names}")
    script_errors = [e for e in console.errors() if EXTENSION_SCRIPT in e]
    if script_errors:
        raise WorkflowCheckError(f"{EXTENSION_SCRIPT} logged errors:\n" + "\n".join(script_errors))


def check_and_shoot(page, workflow: Path, picture: Path, console: Console, zoom: float) -> dict:
    """Load ``workflow``, check it, fit it to the view and save ``picture``; return a summary."""
    graph = json.loads(workflow.read_text())
    since = console.mark()
    loaded = page.evaluate(LOAD_JS, [graph, workflow.stem])
    if loaded["unregistered"]:
        raise WorkflowCheckError(f"{workflow.name}: node types unknown to the frontend: {loaded['unregistered']}")
    if sorted(loaded["types"]) != sorted(n["type"] for n in graph["nodes"]):
        raise WorkflowCheckError(f"{workflow.name}: the frontend built {loaded['types']}")
    time.sleep(SETTLE_S)
    dialogs = page.evaluate(OPEN_DIALOGS_JS)
    if dialogs:
        raise WorkflowCheckError(f"{workflow.name}: dialogs opened on load: {dialogs}")
    errors = console.errors(since)
    if errors:
        raise WorkflowCheckError(f"{workflow.name}: console errors while loading:\n" + "\n".join(errors))

    badge = page.evaluate(BADGE_JS, STORY_NODE)
    if "error" in badge:
        raise WorkflowCheckError(f"{workflow.name}: {badge['error']}")
    want = expected_badge(badge["story"])
    if want not in badge["texts"]:
        raise WorkflowCheckError(f"{workflow.name}: badge drew {badge['texts']}, expected {want!r}")

    scale = page.evaluate(FIT_JS, zoom)
    time.sleep(SETTLE_S)
    page.screenshot(path=str(picture))
    return {
        "nodes": len(loaded["types"]), "links": loaded["links"], "badge": want, "scale": round(scale, 3),
        "warnings": console.warnings(since), "picture": picture, "kib": picture.stat().st_size / 1024,
    }  # fmt: skip


def run(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    comfy_dir = comfy_host.find_comfyui()
    if comfy_dir is None:
        raise SystemExit(comfy_host.missing_message())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="consistent_story_shots_") as base:
        server = ComfyServer(comfy_dir, Path(base)).start()
        try:
            for key, value in PICTURE_SETTINGS.items():
                server.request(f"/settings/{key}", value)
            print(f"ComfyUI on {server.url} (started in {server.start_seconds:.1f} s)")
            with sync_playwright() as playwright:
                # launch() gives the browser a new empty profile of its own, removed on close.
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
                try:
                    other_errors: dict[str, None] = {}
                    for workflow in args.workflows:
                        # A fresh page (and browser context) per workflow: one open tab per picture.
                        viewport = {"width": args.width, "height": args.height}
                        page = browser.new_page(viewport=viewport, device_scale_factor=args.pixel_ratio)
                        console = Console(page)
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
    except WorkflowCheckError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
