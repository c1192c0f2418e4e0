"""The English locale file: generated from the nodes' schemas, current, and served by ComfyUI.

ComfyUI reads ``<pack>/locales/<lang>/*.json`` and serves them at ``/i18n``; the frontend looks
node titles, tooltips and output names up there before the schema.
"""
import json

import pytest

import write_locales

pytestmark = [pytest.mark.integration]


def test_locale_file_matches_the_node_schemas(comfy):
    current = json.loads(write_locales.NODE_DEFS_FILE.read_text(encoding="utf-8"))
    expected = write_locales.node_defs(comfy.NODE_CLASS_MAPPINGS)
    assert sorted(expected) == sorted(current), "run python scripts/write_locales.py"
    assert expected == current, "locales/en/nodeDefs.json is stale: run python scripts/write_locales.py"
    for node_id, entry in current.items():
        assert entry["display_name"] and entry["description"], node_id
        assert all(value.get("tooltip") for value in entry["inputs"].values()), node_id


@pytest.mark.server
def test_server_serves_the_locale_to_the_frontend(comfy_server):
    english = comfy_server.get_json("/i18n")["en"]
    assert english["nodeDefs"]["ConsistentStoryPrompts"]["display_name"] == "Story Prompts"
    assert english["nodeDefs"]["ConsistentStorySelfAttention"]["inputs"]["story"]["tooltip"]
