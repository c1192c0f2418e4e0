"""A story spread over two ComfyUI servers by ComfyUI-Distributed gives the pages one server gives.

Two real servers on loopback (a master and a worker, tests/harness/distributed.py), a random-weight
SD1.5 checkpoint, the CPU. The engine's Distributed Value gives each server its Story Prompts
``panels`` (master 1-4, worker 5-7); each server tags its decoded panels (Tag Story Part), the
engine's Distributed Collector brings the worker's to the master, Join Story Parts puts them in
story order and Comic Page lays them out: the same pages, to the bit, as one server's whole run.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from harness.distributed import WORKER_ID, queue_distributed, start_pair
from harness.server import ServerError
from test_story_attention import STORY  # Bob and Alice, 7 panels; identity panels Bob 1, 3; Alice 2, 6

pytestmark = [pytest.mark.integration, pytest.mark.server]

MASTER_PANELS, WORKER_PANELS = "1-4", "5-7"
MASTER_ROWS, WORKER_ROWS = 5, 6  # with their identity panels: 1-4 + 6; 5-7 + 1, 2, 3


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


def story_prompt(ckpt_name: str, name: str, parts: dict | None = None) -> dict:
    """The story graph as an API prompt: one server's whole run, or with ``parts`` ({"master": panels,
    "1": worker 1's panels}) the distributed one (Distributed Value -> panels; Tag Story Part ->
    Distributed Collector -> Join Story Parts -> Comic Page)."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "story": {"class_type": "ConsistentStoryPrompts", "inputs": {
            "clip": ["ckpt", 1], "story": STORY, "style": "No style", "negative": "blurry", "panels": ""}},
        "latent": {"class_type": "ConsistentStoryLatent", "inputs": {"story": ["story", 4], "width": 64, "height": 64}},
        "csa": {"class_type": "ConsistentStorySelfAttention", "inputs": {
            "model": ["ckpt", 0], "rate_fine": 0.5, "rate_coarse": 0.5, "window": 0, "blocks": "output",
            "custom_blocks": "", "schedule": "official", "start_percent": 0.0, "end_percent": 1.0, "seed": 4,
            "story": ["story", 4], "panels_per_call": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["csa", 0], "positive": ["story", 0], "negative": ["story", 1], "latent_image": ["latent", 0],
            "seed": 3, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "page": {"class_type": "ConsistentStoryComicPage", "inputs": {
            "images": ["decode", 0], "captions": "", "layout": "grid", "columns": 4, "seed": 0,
            "reading_order": "left to right", "page_width": 320, "panels_per_page": 4, "gutter": 4, "margin": 4,
            "caption_font_size": 0, "background_color": "#FFFFFF", "story": ["story", 4], "name": name}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["page", 0], "filename_prefix": name}},
    }
    if parts is not None:
        workers = {key: value for key, value in parts.items() if key != "master"}
        prompt.update({
            "panels": {"class_type": "DistributedValue", "inputs": {
                "default_value": parts["master"], "worker_values": json.dumps(workers)}},
            "tag": {"class_type": "ConsistentStoryTagPart", "inputs": {"story": ["story", 4], "images": ["decode", 0]}},
            "collect": {"class_type": "DistributedCollector", "inputs": {"images": ["tag", 0], "load_balance": False}},
            "join": {"class_type": "ConsistentStoryJoinParts", "inputs": {"story": ["story", 4], "images": ["collect", 0]}},
            "master part": {"class_type": "PreviewImage", "inputs": {"images": ["tag", 0]}},
        })
        prompt["story"]["inputs"]["panels"] = ["panels", 0]
        prompt["page"]["inputs"].update(images=["join", 0], story=["join", 1])
    return prompt


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

    one = master.run(story_prompt(ckpt, "one server"))
    parts = {"master": MASTER_PANELS, WORKER_ID: WORKER_PANELS}
    two = master.wait(queue_distributed(master, story_prompt(ckpt, "two servers", parts)))
    assert two["status"]["status_str"] == "success", two["status"]

    worker_entry = worker_history(worker)
    assert worker_entry["status"]["status_str"] == "success", worker_entry["status"]
    worker_preview = next(iter(worker_entry["outputs"].values()))  # the engine's preview of the worker's part
    assert len(worker_preview["images"]) == 1 + WORKER_ROWS, "the worker drew panels 5-7 and their identity panels"
    assert len(pixels(master, two, "master part")) == 1 + MASTER_ROWS, "the master drew panels 1-4 and panel 6"

    expected, pages = pixels(master, one, "save"), pixels(master, two, "save")
    assert len(pages) == len(expected) == 2
    for page, same in zip(pages, expected):
        assert np.array_equal(page, same), "the pages of two servers are those of one, to the bit"
