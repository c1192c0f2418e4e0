"""A story spread over two ComfyUI servers by ComfyUI-Distributed gives the pages one server gives.

Two real servers on loopback (a master and a worker, tests/harness/distributed.py), a random-weight
SD1.5 checkpoint, the CPU. The shipped workflow (workflows/ComfyUI-Distributed/) runs as the
engine runs it: its Distributed Value gives each server its Story Prompts ``panels`` (master 1-4,
worker 5-7), each server tags its decoded panels (Tag Story Part), the engine's Distributed
Collector brings the worker's part to the master, Join Story Parts puts the parts in story order
and Comic Page lays them out. The reference is the same workflow as one server runs a whole story:
the parts' nodes taken out, Story Prompts' panels empty, the decoded panels straight into Comic Page.
"""
from __future__ import annotations

import copy
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from harness.distributed import WORKER_ID, queue_distributed, start_pair
from harness.pack import load_pack
from harness.server import ServerError
from harness.workflow import COMIC_PAGE, WORKFLOW_DIR, load_workflow, nodes_of_type, set_widgets, ui_to_api

pytestmark = [pytest.mark.integration, pytest.mark.server]

WORKFLOW = WORKFLOW_DIR / "ComfyUI-Distributed" / "Story across servers (SD1.5).json"
PART_NODES = ("DistributedValue", "ConsistentStoryTagPart", "DistributedCollector", "ConsistentStoryJoinParts")
SIZE, STEPS = 64, 1  # 512 px panels in the file: pages and gutters scaled alike


@pytest.fixture(scope="module")
def servers(comfy, tmp_path_factory):
    """(master, worker) with the pack and ComfyUI-Distributed; fails (never skips) without the engine."""
    try:
        master, worker = start_pair(comfy.comfy_dir, tmp_path_factory.mktemp("distributed"))
    except ServerError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield master, worker
    finally:
        master.stop()
        worker.stop()


def shipped_prompt(master, ckpt_name: str) -> dict:
    """The workflow file as the master's frontend would queue it, on the test checkpoint, small and short."""
    prompt = ui_to_api(load_workflow(WORKFLOW), master.object_info())
    set_widgets(prompt, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    set_widgets(prompt, "ConsistentStoryLatent", width=SIZE, height=SIZE)
    set_widgets(prompt, "KSampler", steps=STEPS)
    set_widgets(prompt, COMIC_PAGE, page_width=192, gutter=2, margin=3)
    return prompt


def one_server(prompt: dict) -> dict:
    """The same story drawn whole on one server: no parts, the decoded panels straight into Comic Page."""
    prompt = copy.deepcopy(prompt)
    (tag,) = nodes_of_type(prompt, "ConsistentStoryTagPart").values()
    for node_id in [i for i, node in prompt.items() if node["class_type"] in PART_NODES]:
        del prompt[node_id]
    for node in nodes_of_type(prompt, "ConsistentStoryPrompts").values():
        node["inputs"]["panels"] = ""  # was the Distributed Value's link
    for node in nodes_of_type(prompt, COMIC_PAGE).values():
        node["inputs"].update(images=tag["inputs"]["images"], story=tag["inputs"]["story"])  # were Join's links
    return prompt


def drawn_rows(prompt: dict, part: str) -> int:
    """Panels a part draws: its panels and the identity panels of the characters they name."""
    load_pack()
    from consistent_story.nodes.story.story_prompts import parse_story

    (story,) = nodes_of_type(prompt, "ConsistentStoryPrompts").values()
    inputs = story["inputs"]
    parsed = parse_story(inputs["story"], inputs["style"], inputs["custom_style"], inputs["negative"])
    return len(parsed.select(part, inputs["identity_panels"]).drawn)


def pixels(server, entry: dict, node: str) -> list[np.ndarray]:
    refs = entry["outputs"][node]["images"]
    return [np.asarray(Image.open(io.BytesIO(server.view(ref))).convert("RGB")) for ref in refs]


def worker_history(worker, timeout: float = 60) -> dict:
    """The worker's one finished prompt (the engine sent it; the worker's collector sent its part back)."""
    deadline = time.monotonic() + timeout
    while True:
        history = worker.get_json("/history")
        done = [e for e in history.values() if e.get("status", {}).get("status_str") in ("success", "error")]
        if done or time.monotonic() > deadline:
            assert len(history) == len(done) == 1, f"the worker ran {len(history)} prompts: {history}"
            return done[0]
        time.sleep(0.2)


def test_two_servers_give_the_pages_of_one(servers, checkpoints):
    master, worker = servers
    checkpoints["sd15_small"]  # built on first use
    ckpt = master.add_checkpoint(checkpoints.path("sd15_small"))
    assert worker.add_checkpoint(checkpoints.path("sd15_small")) == ckpt
    shipped = shipped_prompt(master, ckpt)
    (value,) = nodes_of_type(shipped, "DistributedValue").values()
    parts = {"master": value["inputs"]["default_value"], **json.loads(value["inputs"]["worker_values"])}
    assert (parts["master"], parts[WORKER_ID]) == ("1-4", "5-7"), "the file splits its 7 panels over two servers"

    reference = one_server(shipped)
    set_widgets(reference, COMIC_PAGE, name="one server")
    one = master.run(reference)
    set_widgets(shipped, COMIC_PAGE, name="two servers")  # no saved panel of the reference run is read
    (tag_id,) = nodes_of_type(shipped, "ConsistentStoryTagPart")
    shipped["master part"] = {"class_type": "PreviewImage", "inputs": {"images": [tag_id, 0]}}
    two = master.wait(queue_distributed(master, shipped))
    assert two["status"]["status_str"] == "success", two["status"]

    worker_entry = worker_history(worker)
    assert worker_entry["status"]["status_str"] == "success", worker_entry["status"]
    worker_part = next(iter(worker_entry["outputs"].values()))  # the engine's preview of the worker's part
    assert len(worker_part["images"]) == 1 + drawn_rows(shipped, parts[WORKER_ID]), "the worker drew 5-7 (+ ids)"
    assert len(pixels(master, two, "master part")) == 1 + drawn_rows(shipped, parts["master"]), "the master: 1-4"

    (page_id,) = nodes_of_type(shipped, "SaveImage")
    expected, pages = pixels(master, one, page_id), pixels(master, two, page_id)
    assert len(pages) == len(expected) >= 1
    for page, same in zip(pages, expected):
        assert np.array_equal(page, same), "the pages of two servers are those of one, to the bit"
