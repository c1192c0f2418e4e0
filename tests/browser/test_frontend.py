"""The pack in ComfyUI's real frontend: headless Chromium on a real ``main.py --cpu`` (conftest.py).

As a user does it: every shipped workflow is opened from the template browser (sidebar
Templates, the pack's folder, its card), with no missing-nodes dialog, every node type
registered, no console error while it loads and none from the pack at all, and the Story
Prompts badge counting what the pack's parser counts. One workflow is then made small in the
page's own widgets (the test checkpoint, 32 px panels, one step: harness.workflow.shrink),
queued with the Run button, and its comic page must appear in the Save node. A screenshot of
each graph and of the result is saved (conftest.py says where).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from harness.browser import (
    BADGE_JS, PACK_MARKERS, close_dialogs, REDRAW_S, SET_SETTING_JS, STORY_NODE, TEMPLATE_CARD, VUE_NODES_SETTING, card_thumbnail_width, check_badge,
    check_graph, check_vue_badge, fit_view, load_template, open_templates, search_templates,
)
from harness.browser_errors import click_run
from harness.server import PACK_LINK_NAME
from harness.stories import BOB_AND_ALICE, BOB_AND_ALICE_AT_A_GLANCE
from harness.workflow import (
    COMIC_PAGE, WORKFLOW_DIR, WORKFLOWS, load_workflow, nodes_of_type, set_widgets, shrink, ui_to_api,
    workflow_id,
)
from harness.workflow_models import by_workflow_on_this_host

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.browser]

QUEUED = "Consistent Story - Comic page (SD1.5)"
SIZE, STEPS = 32, 1  # small: this run is about the round trip through the page, not the pictures
ZOOM = 0.95
VUE_NODES_SINCE = (1, 30)  # the first frontends with a Vue nodes mode are newer than 1.27

# Set widget values by node id and widget name; return those that changed.
SET_WIDGETS_JS = """
(values) => {
  const changed = [];
  for (const [id, inputs] of Object.entries(values)) {
    const node = app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(inputs)) {
      const widget = node?.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`node ${id} has no widget ${name}`);
      if (widget.value === value) continue;
      widget.value = value;
      widget.callback?.(value);
      changed.push([id, name]);
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return changed;
}
"""
# The page received the node's output (the "executed" message of its own websocket).
HAS_OUTPUT_JS = "(id) => (app.nodeOutputs[String(id)]?.images ?? []).length > 0"
# The node shows its output: images loaded on the node (drawn on the canvas once it is in view).
SHOWN_JS = """
([id, filename]) => {
  const imgs = app.graph.getNodeById(Number(id))?.imgs ?? [];
  const ready = imgs.length && imgs.every((img) => img.complete && img.naturalWidth > 0);
  if (!ready || !decodeURIComponent(imgs[0].src).includes(filename)) return null;
  return imgs.map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight }));
}
"""


def shoot(page, shots_dir: Path, name: str, browser_report: dict) -> Path:
    picture = shots_dir / f"{name}.png"
    page.screenshot(path=str(picture))
    browser_report["shots"].append(picture)
    return picture


def test_template_browser_lists_every_workflow_with_its_thumbnail(frontend, comfy_server, shots_dir, browser_report):
    page, console = frontend
    names = sorted(path.stem for path in WORKFLOWS)
    assert sorted(comfy_server.get_json("/workflow_templates")[PACK_LINK_NAME]) == names
    since = console.mark()
    cards = open_templates(page)
    assert sorted(cards) == names
    thumbnails = {name: card_thumbnail_width(page, name) for name in cards}
    assert [name for name, width in thumbnails.items() if not width] == [], "thumbnails not shown"
    # A custom node's card is titled with its file name: the workflows are named by their titles.
    texts = {name: page.locator(TEMPLATE_CARD.format(name=name)).inner_text() for name in cards}
    assert [name for name, text in texts.items() if name not in text] == [], texts
    card_thumbnail_width(page, cards[0])  # back to the first row, its thumbnails shown
    page.wait_for_timeout(REDRAW_S * 1000)
    shoot(page, shots_dir, "template_browser", browser_report)
    assert console.load_errors(since) == []


def test_template_search_finds_the_packs_workflows(frontend):
    """The search box finds the pack's workflows by their names, in its folder and in the whole
    browser: the comic ones by "comic", every one by "consistent" (frontend 1.58 searches the file
    name only, which starts with the pack's name)."""
    page, console = frontend
    names = open_templates(page)
    comics = sorted(name for name in names if "comic" in name.lower())
    assert comics, names
    assert sorted(search_templates(page, "comic")) == comics
    assert sorted(search_templates(page, "consistent")) == sorted(names)
    page.keyboard.press("Escape")
    close_dialogs(page)
    page.get_by_role("button", name="Templates", exact=True).click()
    for query, expected in (("comic page", comics), ("comic", comics), ("consistent", names)):
        found = search_templates(page, query)
        assert set(expected) <= set(found), (query, found)
    assert console.pack_errors() == []


def provide_input_pictures(workflow: dict, comfy_server) -> None:
    """The picture each Load Image node names, in the server's input folder, as the user has it
    (else the frontend's preview request is a 404 in the console)."""
    for node in workflow["nodes"]:
        picture = comfy_server.base / "input" / str((node.get("widgets_values") or [""])[0])
        if node["type"] == "LoadImage" and not picture.exists():
            Image.new("RGB", (SIZE, SIZE), "#9ad").save(picture)


@by_workflow_on_this_host(WORKFLOWS)  # a workflow for a family this ComfyUI lacks would open with missing nodes
def test_workflow_opens_from_the_template_browser(path, frontend, comfy_server, shots_dir, browser_report):
    page, console = frontend
    workflow = load_workflow(path)
    provide_input_pictures(workflow, comfy_server)
    since = console.mark()
    open_templates(page)
    load_template(page, path.stem)
    summary = check_graph(page, workflow, path.name, console, since, settle_s=0)  # load_template waited
    assert summary["nodes"] == len(workflow["nodes"]) and summary["links"] == len(workflow["links"])
    fit_view(page, ZOOM, settle_s=REDRAW_S)
    shoot(page, shots_dir, workflow_id(path), browser_report)


def small_prompt_values(workflow: dict, comfy_server, ckpt_name: str) -> tuple[dict, dict]:
    """The workflow as the server would run it on the test checkpoint at ``SIZE`` px and ``STEPS``
    steps, and its widget values by node id."""
    prompt = ui_to_api(workflow, comfy_server.object_info())
    set_widgets(prompt, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    shrink(prompt, SIZE, STEPS)
    values = {}
    for node_id, node in prompt.items():
        widgets = {name: value for name, value in node["inputs"].items() if not isinstance(value, list)}
        values[node_id] = {name: v["__value__"] if isinstance(v, dict) else v for name, v in widgets.items()}
    return prompt, values


def test_queued_workflow_shows_its_page_in_the_save_node(frontend, comfy_server, server_checkpoint, shots_dir,
                                                         browser_report):  # fmt: skip
    page, console = frontend
    workflow = load_workflow(WORKFLOW_DIR / f"{QUEUED}.json")
    open_templates(page)
    load_template(page, QUEUED)
    prompt, values = small_prompt_values(workflow, comfy_server, server_checkpoint)
    changed = {name for _, name in page.evaluate(SET_WIDGETS_JS, values)}
    assert {"ckpt_name", "width", "height", "steps"} <= changed

    since = console.mark()
    reply = click_run(page)
    assert not reply.get("node_errors"), reply
    entry = comfy_server.wait(reply["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]

    (save_id, _), (_, page_node) = (next(iter(nodes_of_type(prompt, t).items())) for t in ("SaveImage", COMIC_PAGE))
    saved = entry["outputs"][save_id]["images"]
    assert len(saved) == 1, "one comic page"
    page.wait_for_function(HAS_OUTPUT_JS, arg=save_id)
    fit_view(page, 0.8, [int(save_id)], settle_s=REDRAW_S)
    shown = page.wait_for_function(SHOWN_JS, arg=[save_id, saved[0]["filename"]]).json_value()
    assert [image["width"] for image in shown] == [page_node["inputs"]["page_width"]]
    shoot(page, shots_dir, f"queued_{workflow_id(QUEUED)}", browser_report)
    assert console.pack_errors(since) == []


# Give the sampler an Empty Latent Image with a typed batch, as a user might: in place of the
# shipped workflow's Story Latent (which sets no batch size) the first time, the same one after.
TYPE_BATCH_JS = """
(batch) => {
  let latent = app.graph.nodes.find((n) => n.type === "EmptyLatentImage");
  if (!latent) {
    const story = app.graph.nodes.find((n) => n.type === "ConsistentStoryLatent");
    const sampler = app.graph.nodes.find((n) => n.inputs?.some((i) => i.name === "latent_image"));
    latent = LiteGraph.createNode("EmptyLatentImage");
    latent.pos = [story.pos[0], story.pos[1]];
    app.graph.remove(story);
    app.graph.add(latent);
    latent.connect(0, sampler, sampler.inputs.findIndex((i) => i.name === "latent_image"));
  }
  const slot = latent.inputs?.findIndex((i) => i.name === "batch_size") ?? -1;
  if (slot >= 0 && latent.isInputConnected(slot)) latent.disconnectInput(slot);
  latent.widgets.find((w) => w.name === "batch_size").value = batch;
  app.graph.setDirtyCanvas(true, true);
}
"""


def test_badge_warns_when_the_latent_batch_is_not_the_panel_count(frontend):
    """Without Consistent Self-Attention nothing of the pack runs before sampling: the editor is
    where a latent batch that is not the story's panel count can be caught."""
    page, console = frontend
    open_templates(page)
    load_template(page, QUEUED)

    def badge() -> str:  # checked against the pack's parser each time
        return check_badge(page, QUEUED)

    panels = int(badge().split(" panels")[0])
    assert "latent batch_size" not in badge()  # the shipped wiring: no warning
    page.evaluate(TYPE_BATCH_JS, panels - 3)
    assert f"latent batch_size {panels - 3} ≠ {panels} panels: use Story Latent or connect panel_count" in badge()
    page.evaluate(TYPE_BATCH_JS, panels)
    assert "latent batch_size" not in badge()
    assert console.pack_errors() == []


def test_badge_shows_in_vue_nodes_mode(frontend):
    """With the frontend's Vue nodes on (a DOM node per graph node, no canvas drawing of nodes),
    the badge is still on Story Prompts, clear of its title, and follows the graph."""
    page, console = frontend
    open_templates(page)
    load_template(page, QUEUED)
    text = check_badge(page, QUEUED)
    node_id = page.evaluate(BADGE_JS, [STORY_NODE, "/"])["id"]
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    if tuple(int(part) for part in version.split(".")[:2]) < VUE_NODES_SINCE:
        return  # frontend 1.27 has no Vue nodes mode: the canvas badge above is all it shows
    page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, True])
    try:
        fit_view(page, 0.8, [node_id], settle_s=REDRAW_S)
        check_vue_badge(page, node_id, text)
        panels = int(text.split(" panels")[0])
        page.evaluate(TYPE_BATCH_JS, panels - 3)
        check_vue_badge(page, node_id, check_badge(page, QUEUED))
    finally:
        page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, False])
    assert console.pack_errors() == []


# The "story at a glance" switch of Story Prompts (web/story_glance.js), flipped as a click does.
GLANCE_SWITCH_JS = """
([id, on]) => {
  const widget = app.graph.getNodeById(id).widgets.find((w) => w.name === "story at a glance");
  widget.value = on;
  widget.callback?.(on);
  app.graph.setDirtyCanvas(true, true);
}
"""
# The view's text once shown on the page (in the Vue node when ``vue``), else null.
GLANCE_TEXT_JS = """
([id, vue]) => {
  const view = document.querySelector(".consistent-story-glance");
  const shown = view && view.getClientRects().length > 0 && view.value !== "";
  const inNode = !vue || !!view?.closest(`[data-node-id="${id}"]`);
  return shown && inNode ? view.value : null;
}
"""


def test_story_at_a_glance_shows_each_panels_role_while_editing(frontend, shots_dir, browser_report):
    """The switch shows each panel's role and final prompt from the pack's parser (the server's
    route), follows the story as it is edited, shows the parser's message for a bad story, and
    is shown in the Vue nodes mode too."""
    page, console = frontend
    open_templates(page)
    load_template(page, QUEUED)
    node_id = page.evaluate(BADGE_JS, [STORY_NODE, "/"])["id"]
    since = console.mark()
    fit_view(page, 0.8, [node_id], settle_s=REDRAW_S)

    def shown(text: str, vue: bool = False) -> None:
        page.wait_for_function(f"(args) => ({GLANCE_TEXT_JS})(args) === {json.dumps(text)}", arg=[node_id, vue])

    page.evaluate(GLANCE_SWITCH_JS, [node_id, True])
    page.evaluate(SET_WIDGETS_JS, {node_id: {"story": BOB_AND_ALICE, "style": "No style", "panels": "",
                                             "identity_panels": 2}})  # fmt: skip
    shown("\n".join(BOB_AND_ALICE_AT_A_GLANCE))
    shoot(page, shots_dir, "story_at_a_glance", browser_report)
    page.evaluate(SET_WIDGETS_JS, {node_id: {"story": "[Bob] a man\n[Bob] and [Eve] talk"}})
    refused = f"(args) => ({GLANCE_TEXT_JS})(args)?.startsWith('⚠ Story line 2: ')"  # the parser's message
    page.wait_for_function(refused, arg=[node_id, False])
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    if tuple(int(part) for part in version.split(".")[:2]) >= VUE_NODES_SINCE:
        page.evaluate(SET_WIDGETS_JS, {node_id: {"story": BOB_AND_ALICE}})
        page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, True])
        try:
            shown("\n".join(BOB_AND_ALICE_AT_A_GLANCE), vue=True)
            shoot(page, shots_dir, "story_at_a_glance_vue_nodes", browser_report)
        finally:
            page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, False])
    page.evaluate(GLANCE_SWITCH_JS, [node_id, False])
    page.wait_for_function("() => !document.querySelector('.consistent-story-glance')")
    assert console.pack_errors(since) == []
    assert [w for w in console.warnings(since) if any(marker in w for marker in PACK_MARKERS)] == []


# The texts a node draws in its foreground pass while the canvas really draws the graph.
FOREGROUND_TEXTS_JS = """
(id) => {
  const node = app.graph.getNodeById(id);
  const draw = node.onDrawForeground;
  const drawn = [];
  node.onDrawForeground = function (ctx, ...rest) {
    const fillText = ctx.fillText;
    ctx.fillText = function (text, ...args) { drawn.push(String(text)); return fillText.call(this, text, ...args); };
    try { return draw?.call(this, ctx, ...rest); } finally { delete ctx.fillText; }
  };
  try { app.canvas.draw(true, true); } finally { node.onDrawForeground = draw; }
  const slot = node.inputs.findIndex((i) => i.name === "captions");
  return { drawn, connected: node.isInputConnected(slot) };
}
"""
VUE_NODE_TEXT_JS = "(id) => document.querySelector(`[data-node-id=\"${id}\"]`)?.innerText ?? null"


def test_comic_pages_connected_captions_input_is_named(frontend, shots_dir, browser_report):
    """Comic Page's captions wired from Story Prompts: the canvas names the slot (the frontend
    hides the multiline box and leaves a widget's slot unlabelled); Vue nodes name it too."""
    page, console = frontend
    open_templates(page)
    load_template(page, QUEUED)
    node_id = page.evaluate(f"() => app.graph.nodes.find((n) => n.type === '{COMIC_PAGE}').id")
    fit_view(page, 0.8, [node_id], settle_s=REDRAW_S)
    foreground = page.evaluate(FOREGROUND_TEXTS_JS, node_id)
    assert foreground == {"drawn": ["captions"], "connected": True}
    shoot(page, shots_dir, "comic_page_captions", browser_report)
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    if tuple(int(part) for part in version.split(".")[:2]) >= VUE_NODES_SINCE:
        page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, True])
        try:
            page.wait_for_function(f"(id) => ({VUE_NODE_TEXT_JS})(id)?.split('\\n').includes('captions')", arg=node_id)
        finally:
            page.evaluate(SET_SETTING_JS, [VUE_NODES_SETTING, False])
    assert console.pack_errors() == []
