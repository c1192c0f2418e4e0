// Consistent Story: a live "N panels · M characters" badge on the Story Prompts node, so users
// can see, while typing, how many latents the sampler needs (Story Latent makes them; or wire
// panel_count to batch_size).
// A character that no panel shows alone has no identity panel for Consistent Self-Attention:
// the badge names it ("[Mia] never alone") before the run would fail on it.
// The rule mirrors nodes/story/story_prompts.py: a line is a character definition when it starts with
// the only tag on the line, names a character not defined before, is not [NC] and has no '#'.
// The Python parser stays the authority: it raises the real errors when the prompt runs.
// It also warns when the sampler fed by the story's positive prompts takes a latent whose typed
// batch_size differs from the panel count: ComfyUI would silently sample only part of the story
// (or repeat prompts), and without Consistent Self-Attention nothing else in the pack sees the
// latent before sampling.
// With the panels input set ("37", "3, 9-12") it says what will run: "draws 1 panel + 4 identity
// panels" (the chosen panels and the identity panels of the characters they name, as
// nodes/story/story_prompts.py Story.select picks them), or what is wrong with the value.
import { app } from "../../scripts/app.js";

const NODE_ID = "ConsistentStoryPrompts";
const TAG = /\[([^\[\]]*)\]/g;

export function countStory(text) {
  const defined = new Set();
  const alone = new Set();
  let panels = 0;
  const shownBy = [];
  for (const raw of (text || "").split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const hashAt = line.indexOf("#");
    const prompt = (hashAt >= 0 ? line.slice(0, hashAt) : line).trim();
    const names = [...prompt.matchAll(TAG)].map((m) => m[1].split(/\s+/).filter(Boolean).join(" "));
    const isDefinition =
      hashAt < 0 && names.length === 1 && prompt.startsWith("[") &&
      names[0].toUpperCase() !== "NC" && !defined.has(names[0]);
    if (isDefinition) {
      defined.add(names[0]);
      continue;
    }
    panels += 1;
    const shown = new Set(names.filter((n) => n.toUpperCase() !== "NC"));
    shownBy.push(shown);
    if (shown.size === 1) alone.add([...shown][0]);
  }
  const lonely = [...defined].filter((name) => !alone.has(name));
  return { panels, characters: defined.size, lonely, shownBy };
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// What the panels input draws: { text } or { error }; null for "" (the whole story).
export function drawnPanels(spec, { panels, shownBy }, identityPanels) {
  if (!(spec || "").trim()) return null;
  const selected = new Set();
  for (const raw of spec.split(",")) {
    const item = raw.trim();
    if (!item) continue;
    const match = /^(\d+)\s*(?:-\s*(\d+))?$/.exec(item);
    if (!match) return { error: `panels: '${item}' is not a panel number or range` };
    const first = Number(match[1]);
    const last = match[2] ? Number(match[2]) : first;
    if (first > last) return { error: `panels: '${item}' runs backwards` };
    if (first < 1 || last > panels) return { error: `panels: '${item}' is outside 1-${panels}` };
    for (let p = first - 1; p < last; p += 1) selected.add(p);
  }
  if (!selected.size) return { error: "panels names no panel" };
  const named = new Set([...selected].flatMap((p) => [...shownBy[p]]));
  const drawn = new Set(selected);
  for (const name of named) {
    const solo = shownBy.map((shown, p) => (shown.size === 1 && shown.has(name) ? p : -1)).filter((p) => p >= 0);
    for (const p of solo.slice(0, identityPanels)) drawn.add(p);
  }
  const extra = drawn.size - selected.size;
  const text = `draws ${plural(selected.size, "panel")}` + (extra ? ` + ${plural(extra, "identity panel")}` : "");
  return { text, count: drawn.size };
}

// Conditioning may pass through a few nodes (area, combine, ControlNet) before the sampler.
const MAX_HOPS = 4;

// Connectivity through the node's own methods (LiteGraph has had them all along): newer
// frontends deprecate reading input.link and output.links directly.
function targetNodes(node) {
  const targets = [];
  (node.outputs ?? []).forEach((output, slot) => {
    if (output.type === "CONDITIONING") targets.push(...(node.getOutputNodes?.(slot) ?? []));
  });
  return targets;
}

function connected(node, name) {
  const slot = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  return slot >= 0 && node.isInputConnected(slot);
}

// The typed batch_size of the latent a sampler takes (through nodes with one LATENT input),
// or null when it is wired from elsewhere (e.g. from panel_count) or cannot be read.
function typedLatentBatch(sampler) {
  let node = sampler;
  for (let hop = 0; hop <= MAX_HOPS && node; hop += 1) {
    const slot = node.inputs?.findIndex((i, n) => i.type === "LATENT" && node.isInputConnected(n)) ?? -1;
    if (slot < 0) return null;
    node = node.getInputNode(slot);
    if (!node) return null;
    if (connected(node, "batch_size")) return null;
    const widget = node.widgets?.find((w) => w.name === "batch_size");
    if (widget) return Number(widget.value);
  }
  return null;
}

export function latentBatches(storyNode) {
  if (!storyNode.graph) return [];
  const batches = new Set();
  let frontier = [storyNode];
  for (let hop = 0; hop < MAX_HOPS && frontier.length; hop += 1) {
    const next = [];
    for (const node of frontier) {
      for (const target of targetNodes(node)) {
        const isSampler = target.inputs?.some((i) => i.name === "latent_image");
        const batch = isSampler ? typedLatentBatch(target) : null;
        if (batch != null) batches.add(batch);
        if (!isSampler) next.push(target);
      }
    }
    frontier = next;
  }
  return [...batches];
}

function badgeText({ panels, characters, lonely }, batches, drawn) {
  const p = plural(panels, "panel");
  const c = plural(characters, "character");
  const warnings = [];
  if (drawn?.text) warnings.push(drawn.text);
  if (drawn?.error) warnings.push(drawn.error);
  if (lonely.length) warnings.push(`${lonely.map((n) => `[${n}]`).join(", ")} never alone`);
  const expected = drawn?.count ?? panels;
  for (const batch of batches) {
    if (batch !== expected) warnings.push(`latent batch_size ${batch} ≠ ${plural(expected, "panel")}: use Story Latent or connect panel_count`);
  }
  return [`${p} · ${c}`, ...warnings].join(" · ");
}

// A badge as LiteGraph draws them above the title bar (node.badges: its LGraphBadge is not
// exported to extensions, so this one has the same shape). The frontend's Vue nodes show a
// node's badges by their text.
class StoryBadge {
  constructor(text, warn) {
    this.text = text;
    this.warn = warn;
    this.fgColor = "#fff";
    this.bgColor = warn ? "#a4452c" : "#2f5a78";
    this.fontSize = 12;
    this.padding = 6;
    this.height = 20;
    this.cornerRadius = 5;
    this.xOffset = 0;
    this.yOffset = 0;
  }

  get visible() {
    return this.text.length > 0;
  }

  getWidth(ctx) {
    ctx.save();
    ctx.font = `${this.fontSize}px sans-serif`;
    const width = ctx.measureText(this.text).width;
    ctx.restore();
    return width + 2 * this.padding;
  }

  draw(ctx, x, y) {
    if (!this.visible) return;
    const width = this.getWidth(ctx);
    ctx.save();
    ctx.fillStyle = this.bgColor;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, width, this.height, this.cornerRadius);
    else ctx.rect(x, y, width, this.height);
    ctx.fill();
    ctx.font = `${this.fontSize}px sans-serif`;
    ctx.fillStyle = this.fgColor;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2);
    ctx.restore();
  }
}

export function storyBadge(node) {
  const story = node.widgets?.find((w) => w.name === "story");
  if (!story || node.flags?.collapsed) return new StoryBadge("", false);
  const counts = countStory(story.value);
  const batches = latentBatches(node);
  const identity = node.widgets?.find((w) => w.name === "identity_panels");
  const drawn = drawnPanels(node.widgets?.find((w) => w.name === "panels")?.value, counts, Number(identity?.value ?? 2));
  const expected = drawn?.count ?? counts.panels;
  const warn = counts.lonely.length > 0 || Boolean(drawn?.error) || batches.some((b) => b !== expected);
  return new StoryBadge(badgeText(counts, batches, drawn), warn);
}

app.registerExtension({
  name: "ConsistentStory.PanelCount",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_ID && node.type !== NODE_ID) return;
    const badge = () => storyBadge(node);
    badge.consistentStory = true;
    node.badges = [...(node.badges ?? []), badge];
  },
});
