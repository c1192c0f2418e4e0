"""The pack's errors as users meet them in ComfyUI's real frontend (headless Chromium on a real
``main.py --cpu``, as test_frontend.py): an option refused on Run, marked on its node; an error only
sampling can find, its fix first where the frontend shows it (harness.browser_errors names the
frontend's surfaces). After test_frontend.py: 1.58 leaves its issues panel open beside the canvas.
"""
from __future__ import annotations

import pytest

from harness.browser import SET_SETTING_JS, STORY_NODE, load_template, open_templates
from harness.browser_errors import ISSUES_TAB_SETTING, ISSUES_TEXT_JS, VIEW_DETAILS, click_run, failed_run, one_line
from harness.pack import load_pack
from harness.workflow import WORKFLOW_DIR, load_workflow, nodes_of_type
from test_frontend import QUEUED, SET_WIDGETS_JS, TYPE_BATCH_JS, shoot, small_prompt_values

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.browser]


SHOWS_ANY_JS = "(texts) => texts.some((text) => document.body.innerText.includes(text))"
SEE_ERRORS = '[data-testid="error-overlay-see-errors"]'
SHOWN_OR_SUMMED_JS = "([text, button]) => document.body.innerText.includes(text) || !!document.querySelector(button)"


def test_a_bad_option_is_shown_with_its_node_when_run_is_pressed(frontend, comfy_server, server_checkpoint):
    """ComfyUI's validation refuses the prompt (the node's validate_inputs) before anything loads;
    the frontend marks the node and shows the pack's message itself."""
    page, console = frontend
    workflow = load_workflow(WORKFLOW_DIR / f"{QUEUED}.json")
    open_templates(page)
    load_template(page, QUEUED)
    prompt, values = small_prompt_values(workflow, comfy_server, server_checkpoint)
    attention_id = next(iter(nodes_of_type(prompt, "ConsistentStorySelfAttention")))
    values[attention_id].update(blocks="custom", custom_blocks="outptu 0-2")
    page.evaluate(SET_WIDGETS_JS, values)
    refused = click_run(page)["node_errors"]
    assert list(refused) == [attention_id], refused  # one node marked, the rest of the graph fine
    message = "custom_blocks: cannot read 'outptu 0-2'"
    assert message in refused[attention_id]["errors"][0]["details"]
    # 1.27 shows the message in its error dialog; 1.58 sums the errors up ("N issues found") and
    # one click lists them by node and input, the message behind each entry's info button.
    page.wait_for_function(SHOWN_OR_SUMMED_JS, arg=[message, SEE_ERRORS])
    if not page.evaluate(SHOWS_ANY_JS, [message]):
        page.locator(SEE_ERRORS).first.click()
        page.wait_for_function(SHOWS_ANY_JS, arg=[message, "Consistent Self-Attention - custom_blocks"])
    assert page.evaluate("(id) => !!app.lastNodeErrors?.[id]", attention_id)
    assert console.pack_errors() == []


PART = "6"  # the story's [NC] panel: drawn alone, its noise the 6th of the whole story's
NOISE_FIX = "Connect Story Latent directly to the sampler's latent_image: Story Prompts draws part of the story"
ERROR_TYPE = "consistent_story.ConsistentAttentionError"


def test_a_run_time_error_leads_with_the_packs_fix(frontend, comfy_server, server_checkpoint, shots_dir, browser_report):
    """An error only sampling can find (a story drawn in part, the sampler fed Empty Latent Image,
    not Story Latent) reaches the user fix first, its type a name, not a file path: under the node's
    name in 1.27's dialog and in 1.58's (Issues tab off); 1.58's overlay says the same for any node's
    error (harness.browser_errors), the message one "View details" away. The test checkpoint is
    chosen in the file, as a user's own (else 1.58 also counts a missing model)."""
    page, console = frontend
    workflow = load_workflow(WORKFLOW_DIR / f"{QUEUED}.json")
    loader = next(node for node in workflow["nodes"] if node["type"] == "CheckpointLoaderSimple")
    loader["widgets_values"][0] = server_checkpoint
    page.evaluate("(graph) => app.loadGraphData(graph)", workflow)
    prompt, values = small_prompt_values(workflow, comfy_server, server_checkpoint)
    story_id, story_node = next(iter(nodes_of_type(prompt, STORY_NODE).items()))
    page.evaluate(SET_WIDGETS_JS, {**values, story_id: {"panels": PART}})
    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    drawn = parse_story(story_node["inputs"]["story"]).select(PART, story_node["inputs"].get("identity_panels", 2)).drawn
    assert drawn and drawn[0] >= len(drawn), drawn  # not the first panels: Empty Latent Image's noise differs
    page.evaluate(TYPE_BATCH_JS, len(drawn))
    since = console.mark()

    def run_and_read() -> dict:
        received, surface = failed_run(page, comfy_server)
        assert (received["node_type"], received["exception_type"]) == ("KSampler", ERROR_TYPE), received
        assert received["exception_message"].startswith(NOISE_FIX), received
        return surface

    surface = run_and_read()
    shoot(page, shots_dir, f"run_time_error_{surface['kind']}", browser_report)
    if surface["kind"] == "overlay":  # 1.58, Issues tab on (its default)
        assert one_line(surface["text"]).startswith("Error KSampler failed"), surface
        page.locator(VIEW_DETAILS).click()
        details = one_line(page.wait_for_function(ISSUES_TEXT_JS).json_value()).replace("*", "")
        assert f"Exception Type: {ERROR_TYPE}" in details and NOISE_FIX in details, details
        shoot(page, shots_dir, "run_time_error_details", browser_report)
        page.evaluate(SET_SETTING_JS, [ISSUES_TAB_SETTING, False])
        try:
            surface = run_and_read()
            shoot(page, shots_dir, "run_time_error_dialog", browser_report)
        finally:
            page.evaluate(SET_SETTING_JS, [ISSUES_TAB_SETTING, True])
    assert surface["kind"] == "dialog" and NOISE_FIX in one_line(surface["text"]), surface
    assert [e for e in console.pack_errors(since) if ERROR_TYPE not in e] == []
