"""ComfyUI's real frontend in headless Chromium: what tests/browser and scripts/screenshot_workflows.py share.

Debian's Chromium (``/usr/bin/chromium``, or ``$CONSISTENT_STORY_CHROMIUM``) is driven by
Playwright's Python package; Playwright's own browser download is never used. Both come from
``scripts/setup_browser.sh``. The page talks to a server from tests/harness/server.py (loopback
only); the helpers below open the app, open the template browser, check a loaded graph (node
types registered, no title hidden by a node or group, no dialog, no console error, the Story
Prompts badge) and fit it to the view.

The badge is drawn on the canvas, not in the DOM: ``BADGE_JS`` draws the node once into a spare
canvas and keeps the strings its extension writes, and its leading "N panels · M characters" is
compared with what the pack's own parser (nodes/story/story_prompts.py) counts.
"""
from __future__ import annotations

import os
import sys
import time
from urllib.parse import urlsplit

from harness.layout_checks import hidden_titles
from harness.pack import load_pack
from harness.server import PACK_LINK_NAME

CHROMIUM = os.environ.get("CONSISTENT_STORY_CHROMIUM", "/usr/bin/chromium")
SETUP_HINT = "run `bash scripts/setup_browser.sh` (Debian's chromium package and the playwright driver)"
# Flags from the machine notes: no GPU, no network beyond loopback, no first-run chores.
# Playwright's launch() adds --headless and a fresh --user-data-dir of its own.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Stored on the server before the page opens: no first-run panel, minimap or render statistics
# over the graph, full-detail nodes (titles, widget values) at any zoom. The missing-models
# dialog is off (no weights ship with the pack; the workflows name their download URLs); the
# missing-nodes dialog stays on: its absence is what the checks look for.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
}
EXTENSION_NAME = "ConsistentStory.PanelCount"
STORY_NODE = "ConsistentStoryPrompts"
# Text that marks a console message as the pack's: its web extension's URL, node ids, module name.
PACK_MARKERS = (f"/{PACK_LINK_NAME}/", "consistent_story", "ConsistentStory")
READY_TIMEOUT_MS = 120_000
SETTLE_S = 1.5  # after the app appears: first-run panels, restoring the last workflow
BADGE_FONT_PX = 12
REDRAW_S = 0.3  # a few animation frames: Vue renders a dialog, the canvas redraws

READY_JS = "() => !!(window.app && window.app.canvas && window.LiteGraph && window.comfyAPI)"

GRAPH_JS = """
() => ({
  types: app.graph.nodes.map((n) => n.type),
  unregistered: app.graph.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types)),
  links: Object.keys(app.graph.links ?? {}).length,
})
"""

# The pack's badge (a function in node.badges, marked consistentStory) drawn by LiteGraph into a
# spare canvas, with where each string lands (y in node coordinates: the title bar spans
# -NODE_TITLE_HEIGHT..0). Deprecation warnings raised while the pack's code runs are collected
# whatever came first (LiteGraph warns once per message unless alwaysRepeatWarnings): a warning
# is the pack's when the pack's script is on its stack.
BADGE_JS = """
([nodeType, packPath]) => {
  const node = app.graph.nodes.find((n) => n.type === nodeType);
  if (!node) return { error: `no ${nodeType} node in the graph` };
  const badge = (node.badges ?? []).find((b) => b.consistentStory);
  if (!badge) return { error: `the ${nodeType} node has no Consistent Story badge` };
  const lg = window.LiteGraph;
  const deprecations = [];
  const hook = (message) => { if ((new Error().stack ?? "").includes(packPath)) deprecations.push(message); };
  const repeat = lg.alwaysRepeatWarnings;
  lg.onDeprecationWarning?.push(hook);
  lg.alwaysRepeatWarnings = true;
  const ctx = document.createElement("canvas").getContext("2d");
  const drawn = [];
  const fillText = ctx.fillText.bind(ctx);
  ctx.fillText = (text, x, y, ...rest) => { drawn.push({ text: String(text), y }); fillText(text, x, y, ...rest); };
  let text;
  try {
    node.drawBadges(ctx);
    text = badge().text;
  } finally {
    lg.onDeprecationWarning?.splice(lg.onDeprecationWarning.indexOf(hook), 1);
    lg.alwaysRepeatWarnings = repeat;
  }
  const story = node.widgets?.find((w) => w.name === "story");
  return { id: node.id, text, drawn, titleHeight: lg.NODE_TITLE_HEIGHT, deprecations, story: story?.value ?? null };
}
"""
# A Vue-rendered node (the frontend's "Vue nodes" mode): where the badge's text and the title sit.
VUE_BADGE_JS = """
([id, text]) => {
  const root = document.querySelector(`[data-node-id="${id}"]`);
  if (!root) return null;
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const badge = [...root.querySelectorAll("*")].find((e) => e.childElementCount === 0 && e.textContent.trim() === text);
  const title = root.querySelector('[data-testid="node-title"] span') ?? root.querySelector('[data-testid="node-title"]');
  return { badge: badge ? box(badge) : null, title: title ? box(title) : null };
}
"""
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
SET_SETTING_JS = "([key, value]) => app.ui.settings.setSettingValueAsync(key, value)"

# Fit the given nodes (all when none are given), title bars included, into the view.
FIT_JS = """
([zoom, ids]) => {
  const nodes = ids.length ? ids.map((id) => app.graph.getNodeById(id)) : app.graph.nodes;
  const rects = nodes.map((n) => n.boundingRect);
  const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
  const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom });
  app.canvas.setDirty(true, true);
  return app.canvas.ds.scale;
}
"""

OPEN_DIALOGS_JS = """
() => [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
  .filter((d) => d.getClientRects().length > 0)  // shown (offsetParent is null for a fixed dialog)
  .map((d) => (d.querySelector('.comfy-missing-nodes') ? 'MISSING NODES: ' : '') + d.innerText.trim().slice(0, 300))
"""

# Template browser (frontend 1.27): the sidebar's Templates button opens a dialog whose side list
# has one option per custom node pack (its folder name) and one card per workflow.
TEMPLATES_BUTTON = "Templates"
TEMPLATES_DIALOG = '[data-testid="template-workflows-content"]'
TEMPLATE_CARD = '[data-testid="template-workflow-{name}"]'
DIALOG = '[role="dialog"]'
# The pack's folder lists the server's templates for it, and only those (in any order).
PACK_CARDS_SHOWN_JS = """
async (pack) => {
  window.__packTemplates ??= (await (await fetch("api/workflow_templates")).json())[pack] ?? [];
  const shown = [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
    .map((e) => e.dataset.testid.replace("template-workflow-", ""));
  const want = window.__packTemplates;
  return shown.length === want.length && shown.every((name) => want.includes(name));
}
"""
# Count the frontend's completed graph loads (app.loadGraphData, which the template browser calls
# after closing its dialog and which shows the missing-nodes dialog last); return the count so far.
COUNT_LOADS_JS = """
() => {
  if (!app.__consistentStoryLoads) {
    const load = app.loadGraphData;
    app.__consistentStoryLoads = { done: 0 };
    app.loadGraphData = async function (...args) {
      try { return await load.apply(this, args); } finally { app.__consistentStoryLoads.done += 1; }
    };
  }
  return app.__consistentStoryLoads.done;
}
"""
LOADED_SINCE_JS = "(before) => app.__consistentStoryLoads.done > before"


class FrontendCheckError(RuntimeError):
    """The frontend did not load a workflow or the pack's extension cleanly."""


def browser_problem(chromium: str = CHROMIUM) -> str | None:
    """Why the browser cannot be driven here (naming the setup script), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"The playwright package is not installed for {sys.executable}: {SETUP_HINT}."
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        return f"No Chromium at {chromium} ($CONSISTENT_STORY_CHROMIUM): {SETUP_HINT}."
    return None


def launch(playwright, chromium: str = CHROMIUM):
    """Headless Chromium with a new empty profile of its own (removed on close)."""
    return playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)


def store_settings(server, settings: dict = FRONTEND_SETTINGS) -> None:
    for key, value in settings.items():
        server.request(f"/settings/{key}", value)


class Console:
    """Console messages and uncaught page errors, in order, with a mark for 'since when'. Chromium
    logs every failed request (a 404 thumbnail, say) as a console error with its URL."""

    def __init__(self, page, origin: str):
        self.origin = origin
        self.entries: list[tuple[str, str]] = []
        page.on("console", lambda msg: self.entries.append((msg.type, f"{msg.text} @ {msg.location.get('url', '')}")))
        page.on("pageerror", lambda error: self.entries.append(("pageerror", error.stack or str(error))))

    def mark(self) -> int:
        return len(self.entries)

    def errors(self, since: int = 0) -> list[str]:
        return [text for kind, text in self.entries[since:] if kind in ("error", "pageerror")]

    def warnings(self, since: int = 0) -> list[str]:
        return [text for kind, text in self.entries[since:] if kind == "warning"]

    def pack_errors(self, since: int = 0) -> list[str]:
        """Errors that name the pack (its extension script, its templates, its node ids)."""
        return [text for text in self.errors(since) if any(marker in text for marker in PACK_MARKERS)]

    def load_errors(self, since: int = 0) -> list[str]:
        """Errors, less failed requests to other hosts: the frontend asks the internet for
        release notes and such whenever it likes, and this machine has none."""
        return [text for text in self.errors(since) if not self._offsite(text)]

    def _offsite(self, text: str) -> bool:
        url = text.rpartition(" @ ")[2]
        return url.startswith(("http://", "https://")) and urlsplit(url).netloc != urlsplit(self.origin).netloc


def open_app(page, url: str, console: Console) -> None:
    """Open the frontend, wait until ``app`` is ready, and check the pack's extension loaded."""
    page.goto(url + "/", wait_until="domcontentloaded")
    page.wait_for_function(READY_JS, timeout=READY_TIMEOUT_MS)
    time.sleep(SETTLE_S)  # restorePreviousWorkflow and first-run panels run after `app` appears
    page.keyboard.press("Escape")
    names = page.evaluate("() => app.extensions.map((e) => e.name)")
    if EXTENSION_NAME not in names:
        raise FrontendCheckError(f"extension {EXTENSION_NAME} not registered; the frontend has: {names}")
    errors = console.pack_errors()
    if errors:
        raise FrontendCheckError("the pack's web files logged errors:\n" + "\n".join(errors))


# ----------------------------------------------------------------------------------------------
# The template browser
# ----------------------------------------------------------------------------------------------
def open_templates(page, pack_folder: str = PACK_LINK_NAME) -> list[str]:
    """Open the template browser on the pack's category; return the workflow names of its cards.
    Frontend 1.27 lists the category as an option of a list box, newer ones as an item under
    EXTENSIONS in a side navigation; the cards are the pack's once they are the server's list."""
    page.get_by_role("button", name=TEMPLATES_BUTTON, exact=True).click()
    page.wait_for_selector(TEMPLATES_DIALOG)
    option = page.get_by_role("option", name=pack_folder, exact=True)
    if option.count():
        option.click()
    else:
        page.locator(DIALOG).get_by_text(pack_folder, exact=True).first.click()
    return show_pack_cards(page, pack_folder)


def show_pack_cards(page, pack_folder: str = PACK_LINK_NAME) -> list[str]:
    """Wait until the dialog shows exactly the pack's cards; return their names in order."""
    page.wait_for_function(PACK_CARDS_SHOWN_JS, arg=pack_folder)
    return card_names(page)


def card_names(page) -> list[str]:
    cards = page.locator('[data-testid^="template-workflow-"]')
    return [testid.removeprefix("template-workflow-") for testid in cards.evaluate_all("(c) => c.map((e) => e.dataset.testid)")]


def search_templates(page, query: str) -> list[str]:
    """Type ``query`` into the template browser's search box; return the names of the cards
    shown once the list settles (the search runs as one types)."""
    page.locator(DIALOG).locator("input").first.fill(query)
    time.sleep(1.0)
    return card_names(page)


def card_thumbnail_width(page, name: str, timeout_ms: int = 10_000) -> int:
    """Scroll the card of ``name`` into view (thumbnails load when seen) and return its
    thumbnail's width once shown, 0 if it never is (the frontend hides an image until it loads)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    card = page.locator(TEMPLATE_CARD.format(name=name))
    card.scroll_into_view_if_needed()
    image = card.locator("img").first.element_handle()
    try:
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image, timeout=timeout_ms)
    except PlaywrightTimeout:
        pass
    return image.evaluate("(img) => img.naturalWidth")


def close_dialogs(page, attempts: int = 3) -> None:
    """Close whatever dialog is open (Escape), so that each check starts on the bare canvas."""
    for _ in range(attempts):
        if not page.evaluate(OPEN_DIALOGS_JS):
            return
        page.keyboard.press("Escape")
        time.sleep(0.3)
    raise FrontendCheckError(f"dialogs do not close: {page.evaluate(OPEN_DIALOGS_JS)}")


def load_template(page, name: str) -> None:
    """Click the card of ``name`` in the open template browser; return once the frontend has
    loaded the graph (and shown any dialog it shows on load)."""
    before = page.evaluate(COUNT_LOADS_JS)
    card = page.locator(TEMPLATE_CARD.format(name=name))
    card.scroll_into_view_if_needed()
    card.click()
    page.wait_for_function(LOADED_SINCE_JS, arg=before)
    time.sleep(REDRAW_S)


# ----------------------------------------------------------------------------------------------
# Checking a loaded graph
# ----------------------------------------------------------------------------------------------
def story_counts(story_text: str) -> str:
    """The badge's leading "N panels · M characters" for ``story_text``, by the pack's Python parser
    (the authority); the badge may add warnings after a further " · "."""
    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    story = parse_story(story_text)
    panels, characters = len(story.panels), len(story.characters)
    return f"{panels} panel{'' if panels == 1 else 's'} · {characters} character{'' if characters == 1 else 's'}"


def check_graph(page, workflow: dict, name: str, console: Console, since: int, settle_s: float = SETTLE_S) -> dict:
    """Check the graph the frontend built from ``workflow`` (loaded since console mark ``since``,
    any dialog it opens given ``settle_s`` to show); return a summary (node and link counts, the
    badge's text, console warnings)."""
    loaded = page.evaluate(GRAPH_JS)
    if loaded["unregistered"]:
        raise FrontendCheckError(f"{name}: node types unknown to the frontend: {loaded['unregistered']}")
    if sorted(loaded["types"]) != sorted(node["type"] for node in workflow["nodes"]):
        raise FrontendCheckError(f"{name}: the frontend built {loaded['types']}")
    collisions = hidden_titles(page)
    if collisions:
        raise FrontendCheckError(f"{name}: titles hidden in the layout:\n" + "\n".join(collisions))
    time.sleep(settle_s)
    dialogs = page.evaluate(OPEN_DIALOGS_JS)
    if dialogs:
        raise FrontendCheckError(f"{name}: dialogs opened on load: {dialogs}")
    errors = console.load_errors(since)
    if errors:
        raise FrontendCheckError(f"{name}: console errors while loading:\n" + "\n".join(errors))
    return {"nodes": len(loaded["types"]), "links": loaded["links"], "badge": check_badge(page, name),
            "warnings": console.warnings(since)}  # fmt: skip


def check_badge(page, name: str) -> str:
    """The badge text the extension gives Story Prompts; raises unless its counts are the
    parser's, LiteGraph draws it above the title bar (never over the title) and the pack's code
    raised no deprecation warning while it ran."""
    badge = page.evaluate(BADGE_JS, [STORY_NODE, f"/{PACK_LINK_NAME}/"])
    if "error" in badge:
        raise FrontendCheckError(f"{name}: {badge['error']}")
    if badge["deprecations"]:
        raise FrontendCheckError(f"{name}: the pack's badge uses deprecated frontend APIs: {badge['deprecations']}")
    counts, text = story_counts(badge["story"]), badge["text"]
    if not (text == counts or text.startswith(counts + " · ")):
        raise FrontendCheckError(f"{name}: badge reads {text!r}, expected {counts!r} first")
    drawn = [entry["y"] for entry in badge["drawn"] if entry["text"] == text]
    if not drawn:
        raise FrontendCheckError(f"{name}: the badge {text!r} is not drawn; the node drew {badge['drawn']}")
    if max(drawn) > -badge["titleHeight"] - BADGE_FONT_PX / 2:
        raise FrontendCheckError(f"{name}: the badge is drawn at y={max(drawn)}, over the title bar")
    return text


def check_vue_badge(page, node_id, text: str, timeout_s: float = 10) -> dict:
    """The badge's text shown in the Vue-rendered node ``node_id``, clear of its title; returns
    the boxes (page pixels) of both."""
    deadline = time.monotonic() + timeout_s
    while True:
        boxes = page.evaluate(VUE_BADGE_JS, [node_id, text])
        if boxes and boxes["badge"] and boxes["title"]:
            break
        if time.monotonic() > deadline:
            raise FrontendCheckError(f"Vue nodes: node {node_id} shows no badge {text!r} (found {boxes})")
        time.sleep(0.2)
    (bx0, by0, bx1, by1), (tx0, ty0, tx1, ty1) = boxes["badge"], boxes["title"]
    if bx0 < tx1 and tx0 < bx1 and by0 < ty1 and ty0 < by1:
        raise FrontendCheckError(f"Vue nodes: the badge {boxes['badge']} overlaps the title {boxes['title']}")
    return boxes


def fit_view(page, zoom: float, node_ids: list[int] = (), settle_s: float = SETTLE_S) -> float:
    """Fit ``node_ids`` (default: the whole graph) into the view, let it redraw; return the scale."""
    scale = page.evaluate(FIT_JS, [zoom, list(node_ids)])
    time.sleep(settle_s)
    return scale
