"""The story at a glance while editing: ``POST /consistent_story/summary`` on ComfyUI's server.

The web extension sends Story Prompts' widget values (story, style, custom_style, panels,
identity_panels) and shows the rows it gets back: the pack's own parser and ``story_summary``,
the text of the node's ``summary`` output, so the editor never guesses what a run would do. It
runs nothing else. A story the parser refuses answers ``{"error": <the parser's message>}`` with
status 200 (the editor shows it; a 4xx would also be a console error in the browser); a body
that is not such an object is a 400.
"""
from __future__ import annotations

from aiohttp import web

from ..story.story_prompts import DEFAULT_STYLE, parse_story
from ..story.story_summary import story_summary

SUMMARY_PATH = "/consistent_story/summary"
TEXT_FIELDS = ("story", "style", "custom_style", "panels")


def add_summary_route() -> None:
    """Adds the route to ComfyUI's running PromptServer; does nothing when none runs (the pack
    imported by a script or a test: no server, no routes)."""
    import sys

    server = getattr(sys.modules.get("server"), "PromptServer", None)
    instance = getattr(server, "instance", None)
    if instance is not None:
        instance.routes.post(SUMMARY_PATH)(summary)


def summary_rows(body: dict) -> dict:
    """``{"rows": [...]}``: the summary's lines for these widget values, or ``{"error": message}``."""
    texts = {name: body.get(name, "") for name in TEXT_FIELDS}
    texts["style"] = texts["style"] or DEFAULT_STYLE
    identity = body.get("identity_panels")
    if not all(isinstance(value, str) for value in texts.values()) or type(identity) is not int:
        raise TypeError("expected story, style, custom_style, panels (text) and identity_panels (a whole number)")
    try:
        story = parse_story(texts["story"], texts["style"], texts["custom_style"]).select(texts["panels"], identity)
    except ValueError as error:
        return {"error": str(error)}
    return {"rows": story_summary(story, identity).splitlines()}


async def summary(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise TypeError("expected a JSON object")
        return web.json_response(summary_rows(body))
    except (ValueError, TypeError) as error:  # json's ValueError: not JSON
        return web.json_response({"error": f"{SUMMARY_PATH}: {error}"}, status=400)
