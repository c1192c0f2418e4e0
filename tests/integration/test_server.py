"""The pack as a user gets it: installed in custom_nodes/ of a real ComfyUI server.

Expected node ids come from the pack itself (its extension's ``get_node_list``); the server's
``/object_info`` is what the frontend shows.
"""
import asyncio
from pathlib import Path

import pytest

from harness.pack import load_pack
from harness.server import PACK_LINK_NAME

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
