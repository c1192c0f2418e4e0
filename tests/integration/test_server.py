"""The pack as a user gets it: installed in custom_nodes/ of a real ComfyUI server.

Expected node ids come from the pack itself (its extension's ``get_node_list``); the server's
``/object_info`` is what the frontend shows.
"""
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from harness.pack import load_pack
from harness.server import PACK_LINK_NAME
from harness.stories import ALICE, BOB, BOB_AND_ALICE, BOB_AND_ALICE_AT_A_GLANCE

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.server]

PACK_PYTHON_MODULE = f"custom_nodes.{PACK_LINK_NAME}"
CATEGORY = "Consistent Story"  # a readable node-library category


@pytest.fixture(scope="module")
def pack_node_ids(comfy) -> set[str]:
    async def node_list():
        extension = await load_pack().comfy_entrypoint()
        return await extension.get_node_list()

    ids = {node.GET_SCHEMA().node_id for node in asyncio.run(node_list())}
    assert ids, "the pack's extension lists no nodes"
    return ids


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_server_loads_the_pack_without_import_failure(comfy_server):
    assert comfy_server.pack_import_problem() is None, comfy_server.log_tail()


def test_object_info_lists_exactly_the_pack_nodes(pack_node_ids, object_info):
    assert sorted(pack_node_ids - object_info.keys()) == [], "pack nodes missing from /object_info"
    served = {node_id for node_id, info in object_info.items() if info.get("python_module") == PACK_PYTHON_MODULE}
    assert served == pack_node_ids
    assert all(node_id.startswith("ConsistentStory") for node_id in served)


def test_pack_nodes_show_category_description_and_tooltips(pack_node_ids, object_info):
    problems = []
    for node_id in sorted(pack_node_ids & object_info.keys()):
        info = object_info[node_id]
        if info["category"].split("/")[0] != CATEGORY:
            problems.append(f"{node_id}: category {info['category']!r}")
        if not info.get("description", "").strip():
            problems.append(f"{node_id}: no description")
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not options.get("tooltip", "").strip():
                    problems.append(f"{node_id}.{name}: no tooltip")
        doc = REPO_ROOT / "web" / "docs" / f"{node_id}.md"  # the frontend's node documentation panel
        if not doc.is_file() or not doc.read_text(encoding="utf-8").startswith("# "):
            problems.append(f"{node_id}: no web/docs/{node_id}.md")
    assert problems == []


def test_a_killed_test_run_takes_its_server_with_it(comfy, tmp_path):
    """A test process killed outright (SIGKILL, OOM killer) cannot stop its servers itself:
    the kernel must (parent-death signal), or each orphan keeps about 1 GB."""
    starter = (
        "import sys; sys.path[:0] = sys.argv[1:3]\n"
        "from pathlib import Path\n"
        "import comfy_host\n"
        "from harness.server import ComfyServer\n"
        "server = ComfyServer(comfy_host.find_comfyui(), Path(sys.argv[3])).start()\n"
        "print(server.process.pid, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    tests_dir, scripts_dir = REPO_ROOT / "tests", REPO_ROOT / "scripts"
    test_run = subprocess.Popen(
        [sys.executable, "-c", starter, str(tests_dir), str(scripts_dir), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        server_pid = int(test_run.stdout.readline())
        assert _alive(server_pid)
        test_run.send_signal(signal.SIGKILL)
        test_run.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid), f"server {server_pid} outlived its killed test process"
    finally:
        test_run.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper reads as gone; the server is not our child)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# The editor's "story at a glance" (web/story_glance.js) asks the server's parser, not a copy.
SUMMARY_ROUTE = "/api/consistent_story/summary"  # as the frontend's api.fetchApi calls it


def test_summary_route_gives_each_panels_role_and_final_prompt(comfy_server):
    values = {"story": BOB_AND_ALICE, "style": "No style", "custom_style": "", "panels": "", "identity_panels": 2}
    assert json.loads(comfy_server.request(SUMMARY_ROUTE, values))["rows"] == BOB_AND_ALICE_AT_A_GLANCE
    # panels and identity_panels as the node's widgets give them; the style wraps every prompt.
    part = dict(values, style="Comic book", panels="5", identity_panels=1)
    rows = json.loads(comfy_server.request(SUMMARY_ROUTE, part))["rows"]
    assert rows[:2] == ["7 panels · 2 characters · draws 3 of them", "identity panels: Bob 1; Alice 2"]
    assert rows[2].startswith(f"1. identity of Bob, reads nobody: comic book panel of {BOB} walks in the park, ")
    assert rows[4].startswith(f"3. reads Bob 1 (not drawn): comic book panel of {BOB} runs to the station, ")


def test_summary_route_answers_a_bad_story_with_the_parsers_message(comfy_server):
    bad = {"story": "[Bob] a man\n[Bob] and [Eve] talk", "style": "No style", "custom_style": "", "panels": "",
           "identity_panels": 2}  # fmt: skip
    error = json.loads(comfy_server.request(SUMMARY_ROUTE, bad))["error"]
    assert error.startswith("Story line 2: ") and "[Eve]" in error, error
    too_far = dict(bad, story="[Bob] a man\n[Bob] sits", panels="3")
    assert "'3' is outside" in json.loads(comfy_server.request(SUMMARY_ROUTE, too_far))["error"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # not what the editor sends: a 400 naming the fields
        comfy_server.request(SUMMARY_ROUTE, dict(bad, identity_panels="2"))
    assert refused.value.code == 400 and "identity_panels" in json.loads(refused.value.read())["error"]
