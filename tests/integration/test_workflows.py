"""Every shipped workflow (workflows/*.json, UI format) converts with the live node definitions and runs.

The files themselves are converted (tests/harness/workflow.py) and executed in-process on a
random-weight checkpoint of the same family, at 64 px and 2 steps. Outputs are noise: the checks
are on structure (panel and page counts and sizes, saved files).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from harness.checkpoints import release_memory
from harness.workflow import (
    BYPASSED, MUTED, TEST_CHECKPOINT, TITLE_PREFIX, WORKFLOW_DIR, WORKFLOWS, WorkflowError, by_workflow, load_workflow,
    node_definitions, nodes_of_type, set_widgets, shrink, ui_to_api, widget_inputs, workflow_id, workflow_node_types,
)
from harness.workflow_models import (
    DIT_CONFIGS, TEXT_ENCODER_STAND_IN, TextEncoderStandIn, by_workflow_on_this_host, provide_dit_files,
)

pytestmark = pytest.mark.integration

SIZE, STEPS = 64, 2
THUMBNAIL_MAX_BYTES = 60_000
MODEL_FILE_WIDGETS = {"ckpt_name"}




def one(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = nodes_of_type(prompt, class_type)
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return next(iter(found.items()))


def ui_node(workflow: dict, node_type: str) -> dict:
    return next(node for node in workflow["nodes"] if node["type"] == node_type)


@pytest.fixture(scope="module")
def definitions(comfy):
    """/object_info of the node types the shipped workflows use."""
    types = set().union(*(workflow_node_types(load_workflow(path)) for path in WORKFLOWS))
    return node_definitions(comfy.NODE_CLASS_MAPPINGS, types)


@pytest.fixture()
def sd15(definitions):
    """The shipped SD1.5 workflow and its conversion."""
    workflow = load_workflow(WORKFLOW_DIR / "Consistent Story - Comic page (SD1.5).json")
    return workflow, ui_to_api(workflow, definitions)


# ----------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------
def test_workflows_exist_and_each_has_a_test_checkpoint():
    assert WORKFLOWS, f"no workflows in {WORKFLOW_DIR}"
    # The template browser titles a custom node's template with its file name: a title, not a slug,
    # which starts with the pack's name (frontend 1.58's template search reads only the file name).
    slugs = [path.name for path in WORKFLOWS if " " not in path.stem or not path.stem[0].isupper()]
    assert slugs == [], "name workflows by their titles, e.g. 'Consistent Story - Comic page (SD1.5).json'"
    unnamed = [path.name for path in WORKFLOWS if not path.name.startswith(TITLE_PREFIX)]
    assert unnamed == [], f"start each workflow's name with {TITLE_PREFIX!r}: the template search finds it by that"
    unthumbed = [path.name for path in WORKFLOWS if not path.with_suffix(".jpg").is_file()]
    assert unthumbed == [], "each template needs its .jpg thumbnail"
    missing = [path.name for path in WORKFLOWS if workflow_id(path) not in TEST_CHECKPOINT]
    assert not missing, f"add the test checkpoint kind of {missing} to TEST_CHECKPOINT"


@by_workflow(WORKFLOWS)
def test_workflow_has_a_small_jpeg_thumbnail(path):
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} missing: the template browser shows it next to {path.name}"
    assert thumbnail.stat().st_size < THUMBNAIL_MAX_BYTES
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and 200 <= image.width <= 800 and 150 <= image.height <= 800


@by_workflow(WORKFLOWS)
def test_workflow_links_agree_with_node_slots(path):
    workflow = load_workflow(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["version"] == 0.4 and len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(l[0] for l in workflow["links"])
    for link_id, origin, out_slot, target, in_slot, kind in workflow["links"]:
        output, entry = nodes[origin]["outputs"][out_slot], nodes[target]["inputs"][in_slot]
        assert link_id in output["links"] and entry["link"] == link_id
        assert output["type"] == entry["type"] == kind
    link_ids = {link[0] for link in workflow["links"]}
    used_in = [e["link"] for n in workflow["nodes"] for e in n.get("inputs", []) if e.get("link") is not None]
    used_out = [i for n in workflow["nodes"] for o in n.get("outputs", []) for i in o.get("links") or []]
    assert sorted(used_in) == sorted(used_out) == sorted(link_ids)


@by_workflow(WORKFLOWS)
def test_every_workflow_feeds_its_story_to_consistent_self_attention(path):
    from harness.pack import load_pack

    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    workflow = load_workflow(path)
    prompts, csa = ui_node(workflow, "ConsistentStoryPrompts"), ui_node(workflow, "ConsistentStorySelfAttention")
    assert story_source(workflow, csa) is prompts, "the story reaches CSA from Story Prompts (maybe through characters)"
    story = parse_story(prompts["widgets_values"][0], prompts["widgets_values"][1])
    identity = story.identity_panels(csa["widgets_values"][10])  # a character never alone would raise
    assert len(identity) == len(story.characters) >= 1
    if workflow_id(path) == "two_characters_sdxl":
        assert [c.name for c in story.characters] == ["Bob", "Alice"]
        assert any(len(p.characters) == 2 for p in story.panels) and any(not p.characters for p in story.panels)
    if workflow_id(path) == "long_story_of_24_panels_sd1_5":
        assert len(story.panels) >= 24 and len(story.characters) == 2
        assert len(nodes_of_type_ui(workflow, "KSampler")) == 1 and csa["widgets_values"][11] > 0
        assert ui_node(workflow, "ConsistentStoryComicPage")["widgets_values"][7] < len(story.panels), "several pages"


def story_source(workflow: dict, node: dict) -> dict:
    """The node whose story output feeds ``node``'s story input, followed back through character nodes."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    while True:
        link = next(e["link"] for e in node["inputs"] if e["name"] == "story")
        node = nodes[links[link][1]]
        if not node["type"].startswith("ConsistentStoryCharacter") and node["type"] != "ConsistentStoryLoadCharacter":
            return node


def nodes_of_type_ui(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


# ----------------------------------------------------------------------------------------------
# The converter
# ----------------------------------------------------------------------------------------------
def test_conversion_stores_valid_widget_values_under_their_names(sd15, definitions):
    """Widget values land on the right inputs: the frontend's control_after_generate values are skipped."""
    workflow, prompt = sd15
    assert {node["class_type"] for node in prompt.values()} == workflow_node_types(workflow)
    assert "Note" not in workflow_node_types(workflow) and any(n["type"] == "Note" for n in workflow["nodes"])
    python_types = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
    for node_id, node in prompt.items():
        for widget in widget_inputs(definitions[node["class_type"]]):
            value = node["inputs"][widget.name]
            if isinstance(value, list) or widget.name in MODEL_FILE_WIDGETS:
                continue  # linked, or a model file this machine does not have
            where = (node["class_type"], widget.name, value)
            if widget.kind == "COMBO":
                assert value in widget.options["options"], where
            else:
                assert isinstance(value, python_types[widget.kind]), where
                assert isinstance(value, bool) == (widget.kind == "BOOLEAN"), where
    assert prompt[one(prompt, "KSampler")[0]]["inputs"]["steps"] == ui_node(workflow, "KSampler")["widgets_values"][2]


def test_conversion_wires_converted_widgets(sd15):
    _, prompt = sd15
    story_id, _ = one(prompt, "ConsistentStoryPrompts")
    latent_id, latent = one(prompt, "ConsistentStoryLatent")
    assert latent["inputs"]["story"] == [story_id, 4], "one latent per drawn panel, from the story itself"
    assert one(prompt, "KSampler")[1]["inputs"]["latent_image"] == [latent_id, 0], "straight, keeping batch_index"
    assert one(prompt, "ConsistentStoryComicPage")[1]["inputs"]["captions"] == [story_id, 3]
    csa_id, csa = one(prompt, "ConsistentStorySelfAttention")
    assert one(prompt, "KSampler")[1]["inputs"]["model"] == [csa_id, 0]
    assert csa["inputs"]["story"] == [story_id, 4], "the story drives who reads whom"


def test_bypassed_node_passes_its_input_through(sd15, definitions):
    workflow, _ = sd15
    ui_node(workflow, "ConsistentStorySelfAttention")["mode"] = BYPASSED
    prompt = ui_to_api(workflow, definitions)
    assert not nodes_of_type(prompt, "ConsistentStorySelfAttention")
    assert one(prompt, "KSampler")[1]["inputs"]["model"] == [one(prompt, "CheckpointLoaderSimple")[0], 0]


def test_muted_node_and_its_links_are_left_out(sd15, definitions):
    workflow, _ = sd15
    ui_node(workflow, "ConsistentStorySelfAttention")["mode"] = MUTED
    prompt = ui_to_api(workflow, definitions)
    assert not nodes_of_type(prompt, "ConsistentStorySelfAttention")
    assert "model" not in one(prompt, "KSampler")[1]["inputs"]


def test_reroute_is_followed_and_primitive_value_used(sd15, definitions):
    workflow, expected = sd15
    rerouted = copy.deepcopy(workflow)
    decode_link = ui_node(rerouted, "ConsistentStoryComicPage")["inputs"][0]["link"]
    link = next(link for link in rerouted["links"] if link[0] == decode_link)
    reroute_id, new_link = 1000, 1000
    rerouted["nodes"].append({"id": reroute_id, "type": "Reroute", "mode": 0, "widgets_values": None,
                              "inputs": [{"name": "", "type": "*", "link": decode_link}],
                              "outputs": [{"name": "", "type": "IMAGE", "links": [new_link]}]})
    rerouted["links"].append([new_link, reroute_id, 0, link[3], link[4], "IMAGE"])
    link[3:5] = [reroute_id, 0]
    ui_node(rerouted, "ConsistentStoryComicPage")["inputs"][0]["link"] = new_link
    assert ui_to_api(rerouted, definitions) == expected

    latent = ui_node(workflow, "ConsistentStoryLatent")  # its width widget converted to an input, fed by a primitive
    width_link = 1002
    latent["inputs"].append({"name": "width", "type": "INT", "widget": {"name": "width"}, "link": width_link})
    workflow["nodes"].append({"id": 1001, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [448, "fixed"],
                              "outputs": [{"name": "INT", "type": "INT", "links": [width_link], "widget": {"name": "width"}}]})
    workflow["links"].append([width_link, 1001, 0, latent["id"], len(latent["inputs"]) - 1, "INT"])
    assert one(ui_to_api(workflow, definitions), "ConsistentStoryLatent")[1]["inputs"]["width"] == latent["widgets_values"][0]


def test_unknown_node_type_is_named(sd15, definitions):
    workflow, _ = sd15
    ui_node(workflow, "VAEDecode")["type"] = "NoSuchNodeAnywhere"
    with pytest.raises(WorkflowError, match="NoSuchNodeAnywhere"):
        ui_to_api(workflow, definitions)


# ----------------------------------------------------------------------------------------------
# Running every workflow
# ----------------------------------------------------------------------------------------------
def expected_page_count(page_inputs: dict, panels: int) -> int:
    per_page = 4 if page_inputs["layout"] == "four-panel strip" else page_inputs["panels_per_page"]
    return math.ceil(panels / per_page) if per_page else 1


def min_page_height(page_inputs: dict) -> int:
    """Margins and one row of square panels, each at least a full row's share of the width."""
    per_row = 2 if page_inputs["layout"] == "four-panel strip" else page_inputs["columns"]
    margin, gutter = page_inputs["margin"], page_inputs["gutter"]
    return 2 * margin + (page_inputs["page_width"] - 2 * margin - (per_row - 1) * gutter) // per_row


@pytest.fixture()
def csa_calls(comfy, monkeypatch):
    """Every model call (or story sub-call) Consistent Self-Attention ran in the next graphs, as the
    number of layers whose keys it extended there (its own count, ``CallState.extended``)."""
    import sys

    node = comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"]
    call_module = sys.modules[node.__module__.rpartition(".")[0] + ".host.csa_call"]
    original, calls = call_module.CallRunner.run, []

    def run(self, executor, *args, options, **kwargs):
        out = original(self, executor, *args, options=options, **kwargs)
        calls.append(options[call_module.STATE_KEY].extended)
        return out

    monkeypatch.setattr(call_module.CallRunner, "run", run)
    return calls


@pytest.fixture()
def text_encoder_stand_in(comfy):
    comfy.NODE_CLASS_MAPPINGS[TEXT_ENCODER_STAND_IN] = TextEncoderStandIn
    yield
    del comfy.NODE_CLASS_MAPPINGS[TEXT_ENCODER_STAND_IN]


def provide_user_files(prompt: dict, kind: str, comfy) -> None:
    """What a workflow expects the user to have: the LoRA file of a LoraLoader (a random one for the
    test checkpoint), a PhotoMaker model (random weights) and the picture of a LoadImage (a random
    one in the session's input folder)."""
    import folder_paths

    from harness.model_files import build_lora, photomaker_file

    for node in nodes_of_type(prompt, "LoraLoader").values():
        folder = comfy.session_dir / "loras"
        path = folder / f"random_{kind}_{node['inputs']['lora_name']}"
        if not path.exists():
            build_lora(kind, path)
        folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
        node["inputs"]["lora_name"] = path.name
    for node in nodes_of_type(prompt, "PhotoMakerLoader").values():
        node["inputs"]["photomaker_model_name"] = photomaker_file(comfy.session_dir)
    for node in nodes_of_type(prompt, "LoadImage").values():
        picture = Image.fromarray((torch.rand(SIZE, SIZE, 3) * 255).byte().numpy())
        picture.save(Path(folder_paths.get_input_directory()) / node["inputs"]["image"])


@by_workflow_on_this_host(WORKFLOWS)
def test_workflow_runs_and_saves_its_comic_pages(path, comfy, checkpoints, graph_runner, released_after,
                                                 text_encoder_stand_in, csa_calls):
    workflow = load_workflow(path)
    types = workflow_node_types(workflow)
    absent = sorted(t for t in types if t not in comfy.NODE_CLASS_MAPPINGS)
    assert not absent, f"{path.name} uses node types this ComfyUI does not have: {absent}"
    definitions = node_definitions(comfy.NODE_CLASS_MAPPINGS, types)
    prompt = ui_to_api(workflow, definitions)
    kind = TEST_CHECKPOINT[workflow_id(path)]
    if kind in DIT_CONFIGS:
        provide_dit_files(prompt, kind, comfy, definitions)
    else:
        set_widgets(prompt, "CheckpointLoaderSimple", ckpt_name=checkpoints[kind])
    provide_user_files(prompt, kind, comfy)
    shrink(prompt, SIZE, STEPS)

    result = graph_runner(prompt)

    story_id, _ = one(prompt, "ConsistentStoryPrompts")
    panel_count = result.output(story_id, 2)
    assert panel_count >= 2
    panels = result.output(one(prompt, "VAEDecode")[0])
    assert panels.shape == (panel_count, SIZE, SIZE, 3), "one decoded panel per story panel"
    preview_id, _ = one(prompt, "PreviewImage")
    assert len(result.image_paths(preview_id)) == panel_count

    page_id, page = one(prompt, "ConsistentStoryComicPage")
    pages = result.output(page_id)
    count, width = expected_page_count(page["inputs"], panel_count), page["inputs"]["page_width"]
    assert pages.shape[0] == count and pages.shape[2] == width
    assert pages.shape[1] >= min_page_height(page["inputs"])
    saved = result.image_paths(one(prompt, "SaveImage")[0])
    assert len(saved) == count
    for file in saved:
        with Image.open(file) as image:
            assert image.format == "PNG" and image.size == (width, pages.shape[1])

    assert csa_calls and max(csa_calls) > 0, f"CSA extended no layer in any of {len(csa_calls)} model calls"
    csa_calls.clear()
    del result  # its outputs hold the loaded models: let them go before the graph loads its own again
    release_memory()
    set_widgets(prompt, "ConsistentStorySelfAttention", rate_fine=0.0, rate_coarse=0.0)  # installs nothing
    plain = graph_runner(prompt).output(one(prompt, "VAEDecode")[0])
    assert not csa_calls, "CSA off: no model call went through it"
    assert not torch.equal(plain, panels), "the same graph without CSA draws other panels"


def test_the_test_lora_patches_every_attention_projection(comfy, checkpoints, released_after):
    """The random LoRA that stands in for the user's (Consistent Story - Character LoRA (SDXL)) is one ComfyUI applies fully."""
    import folder_paths

    from harness.model_files import build_lora

    folder = comfy.session_dir / "loras"
    path = build_lora("vega_small", folder / "random_vega_small_check.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    from comfy.sd import load_checkpoint_guess_config

    unet_only = dict(output_vae=False, output_clip=False)
    model = load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", checkpoints["vega_small"]),
                                         **unet_only)[0]
    patched, _ = comfy.nodes.LoraLoader().load_lora(model, None, path.name, 1.0, 0.0)
    projections = [name for name, w in model.model.diffusion_model.state_dict().items()
                   if name.endswith(".weight") and w.ndim == 2 and (".attn1." in name or ".attn2." in name)]
    assert projections and len(patched.patches) == len(projections)
