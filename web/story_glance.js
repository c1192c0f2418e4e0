// Consistent Story: the story at a glance, in the editor. A "story at a glance" switch on Story
// Prompts shows, under it, each panel's number, its role (identity panel of a character, whose
// identity panels it reads, [NC]: nobody, not drawn) and its final prompt after the style and
// [Name] replacement: the rows of the node's own summary output, as the pack's Python parser
// gives them (POST /consistent_story/summary, nodes/host/summary_route.py; nothing is parsed here).
// Shown on demand and refreshed, debounced, while the story, style or panels are edited.
// Neither widget is saved with the workflow or sent with the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_ID = "ConsistentStoryPrompts";
const SWITCH = "story at a glance";
const VIEW = "story_at_a_glance";
const INPUTS = ["story", "style", "custom_style", "panels", "identity_panels"];
const DEBOUNCE_MS = 400;
const VIEW_HEIGHT = 160;

// What the server's parser makes of the node's current values: its rows, or its message.
export async function fetchGlance(node) {
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
  const body = Object.fromEntries(INPUTS.map((name) => [name, value(name) ?? ""]));
  body.identity_panels = Number(body.identity_panels);
  const response = await api.fetchApi("/consistent_story/summary", { method: "POST", body: JSON.stringify(body) });
  const reply = await response.json();
  return reply.error ? `⚠ ${reply.error}` : reply.rows.join("\n");
}

function addView(node) {
  const text = document.createElement("textarea");
  text.readOnly = true;
  text.className = "comfy-multiline-input consistent-story-glance";
  text.style.whiteSpace = "pre";
  text.placeholder = "…";
  const view = node.addDOMWidget(VIEW, "consistent_story_glance", text, {
    serialize: false,
    getValue: () => text.value,
    setValue: () => {},
    getMinHeight: () => VIEW_HEIGHT,
  });
  view.serialize = false;
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  return view;
}

function attachGlance(node) {
  let view = null;
  let timer = null;
  let asked = 0; // the latest request: an older reply arriving late is dropped

  const refresh = async () => {
    const request = (asked += 1);
    let shown;
    try {
      shown = await fetchGlance(node);
    } catch (error) {
      shown = `⚠ the story at a glance is unavailable: ${error.message}`;
    }
    if (view && request === asked) view.element.value = shown;
  };
  const schedule = () => {
    if (!view) return;
    clearTimeout(timer);
    timer = setTimeout(refresh, DEBOUNCE_MS);
  };
  const toggle = (on) => {
    clearTimeout(timer);
    if (on && !view) {
      view = addView(node);
      refresh();
    } else if (!on && view) {
      node.removeWidget(view);
      view = null;
    }
    node.setDirtyCanvas?.(true, true);
  };

  for (const widget of node.widgets ?? []) {
    if (!INPUTS.includes(widget.name)) continue;
    const original = widget.callback;
    widget.callback = function (...args) {
      const result = original?.apply(this, args);
      schedule();
      return result;
    };
  }
  const options = { on: "shown", off: "hidden", serialize: false }; // not sent with the prompt
  const switchWidget = node.addWidget("toggle", SWITCH, false, toggle, options);
  switchWidget.serialize = false; // not saved with the workflow
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    clearTimeout(timer);
    return onRemoved?.apply(this, args);
  };
}

app.registerExtension({
  name: "ConsistentStory.Glance",
  nodeCreated(node) {
    if (node.comfyClass === NODE_ID || node.type === NODE_ID) attachGlance(node);
  },
});
