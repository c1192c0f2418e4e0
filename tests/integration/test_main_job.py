"""The main job as a newcomer runs it: scripts/run_example.py in its own process.

It shares the session's random-weight SD1.5 checkpoint through $CONSISTENT_STORY_CACHE (the
main job builds the same file when no SD1.5 checkpoint is installed).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.workflow import (
    TEST_CHECKPOINT, WORKFLOWS, by_workflow, load_workflow, node_definitions, ui_to_api, workflow_id,
    workflow_node_types,
)
from harness.workflow_models import DIT_CONFIGS

pytestmark = [pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIN_JOB = REPO_ROOT / "scripts" / "run_example.py"
STORY = """[Ann] a woman with short red hair and a green coat
[Ann] opens the door of a lighthouse # Ann arrives.
[Ann] climbs the stairs
[NC] a foggy harbour at dawn # The harbour sleeps.
[Ann] reads a map by a window # Where next?
"""


@pytest.fixture(scope="module")
def main_job(comfy, checkpoints, tmp_path_factory):
    """``main_job(*args) -> CompletedProcess`` with the session's checkpoint cache."""
    checkpoints["sd15_small"]  # built once per session; the main job finds it by name
    env = dict(os.environ, CONSISTENT_STORY_CACHE=str(checkpoints.folder.parent), OMP_NUM_THREADS="2")
    output = tmp_path_factory.mktemp("main_job_output")

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(MAIN_JOB), "--output", str(output), "--size", "64", "--steps", "2", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    return run


def test_main_job_draws_your_story(main_job, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text(STORY, encoding="utf-8")
    done = main_job("--story", str(story))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = [Path(line.removeprefix("Comic page: ")) for line in done.stdout.splitlines() if line.startswith("Comic page: ")]
    assert pages and all(page.is_file() for page in pages), done.stdout[-2000:]
    assert f"story from {story}" in done.stdout
    with Image.open(pages[0]) as page:
        assert page.width > 0 and page.height > page.width / 4


def test_a_story_error_is_one_clean_message(main_job, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("[Ann] a woman\n[Bob] walks\n", encoding="utf-8")
    done = main_job("--story", str(story))
    assert done.returncode == 2
    assert "ConsistentStoryPrompts" in done.stderr and "The story has no panels" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_workflow_without_a_checkpoint_is_refused_by_name(main_job):
    done = main_job("--workflow", str(REPO_ROOT / "workflows" / "Consistent Story - Comic page (Flux).json"))
    assert done.returncode == 2
    assert "Consistent Story - Comic page (Flux).json loads no checkpoint" in done.stderr and "Traceback" not in done.stderr


@by_workflow([path for path in WORKFLOWS if TEST_CHECKPOINT[workflow_id(path)] not in DIT_CONFIGS])  # checkpoints
def test_the_family_comes_from_the_graph(path, comfy):
    """With the workflow's checkpoint not installed, its latent size decides (file names do not)."""
    import run_example

    workflow = load_workflow(path)
    prompt = ui_to_api(workflow, node_definitions(comfy.NODE_CLASS_MAPPINGS, workflow_node_types(workflow)))
    expected = {"sd15_small": "sd15", "vega_small": "sdxl"}[TEST_CHECKPOINT[workflow_id(path)]]
    assert run_example.family_of(prompt, "not-installed.safetensors") == expected


def page_of(done: subprocess.CompletedProcess):
    import numpy as np

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [page] = [Path(line.removeprefix("Comic page: ")) for line in done.stdout.splitlines() if line.startswith("Comic page: ")]
    with Image.open(page) as image:
        return np.asarray(image.convert("RGB"))


def test_panels_redraws_one_panel_and_writes_the_whole_runs_pages(main_job, tmp_path):
    """Panel 4's line changes; --panels 4 draws it (and Ann's identity panels) and lays it out with the
    saved panels of the earlier run: the pages of a whole run of the changed story, bit for bit."""
    first, changed = tmp_path / "first.txt", tmp_path / "changed.txt"
    first.write_text(STORY, encoding="utf-8")
    changed.write_text(STORY.replace("reads a map by a window", "waves from a small boat"), encoding="utf-8")
    before = page_of(main_job("--story", str(first)))
    redrawn = main_job("--story", str(changed), "--panels", "4")
    assert "panels 4: the other panels come from consistent_story_panels/" in redrawn.stdout
    after = page_of(redrawn)
    assert after.shape == before.shape and (after != before).any()
    whole = page_of(main_job("--story", str(changed)))
    assert (whole == after).all(), "the same pages as a whole run of the changed story"
