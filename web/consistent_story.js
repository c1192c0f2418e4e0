// Consistent Story: a live "N panels · M characters" badge on the Story Prompts node, so users
// can see, while typing, how many latents the sampler needs (wire panel_count to batch_size).
// A character that no panel shows alone has no identity panel for Consistent Self-Attention:
// the badge names it ("[Mia] never alone") before the run would fail on it.
// The rule mirrors nodes/story_prompts.py: a line is a character definition when it starts with
// the only tag on the line, names a character not defined before, is not [NC] and has no '#'.
// The Python parser stays the authority: it raises the real errors when the prompt runs.
// It also warns when the sampler fed by the story's positive prompts takes a latent whose typed
// batch_size differs from the panel count: ComfyUI would silently sample only part of the story
// (or repeat prompts), and without Consistent Self-Attention nothing else in the pack sees the
// latent before sampling.
// With the panels input set ("37", "3, 9-12") it says what will run: "draws 1 panel + 4 identity
// panels" (the chosen panels and the identity panels of the characters they name, as
// nodes/story_prompts.py Story.select picks them), or what is wrong with the value.
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

// LiteGraph's link lookup (a method in newer frontends, a table in older ones).
function linkOf(graph, linkId) {
  return graph.getLink?.(linkId) ?? graph.links?.[linkId];
}

function linkedNode(graph, linkId) {
  const link = linkOf(graph, linkId);
  return link ? graph.getNodeById(link.origin_id) : null;
}

function targetNodes(graph, node) {
  const targets = [];
  for (const output of node.outputs ?? []) {
    if (output.type !== "CONDITIONING") continue;
    for (const linkId of output.links ?? []) {
      const link = linkOf(graph, linkId);
      const target = link && graph.getNodeById(link.target_id);
      if (target) targets.push(target);
    }
  }
  return targets;
}

// The typed batch_size of the latent a sampler takes (through nodes with one LATENT input),
// or null when it is wired from elsewhere (e.g. from panel_count) or cannot be read.
function typedLatentBatch(graph, sampler) {
  let node = sampler;
  for (let hop = 0; hop <= MAX_HOPS && node; hop += 1) {
    const input = node.inputs?.find((i) => i.type === "LATENT" && i.link != null);
    if (!input) return null;
    node = linkedNode(graph, input.link);
    if (!node) return null;
    if (node.inputs?.some((i) => i.name === "batch_size" && i.link != null)) return null;
    const widget = node.widgets?.find((w) => w.name === "batch_size");
    if (widget) return Number(widget.value);
  }
  return null;
}

export function latentBatches(storyNode) {
  const graph = storyNode.graph;
  if (!graph) return [];
  const batches = new Set();
  let frontier = [storyNode];
  for (let hop = 0; hop < MAX_HOPS && frontier.length; hop += 1) {
    const next = [];
    for (const node of frontier) {
      for (const target of targetNodes(graph, node)) {
        const isSampler = target.inputs?.some((i) => i.name === "latent_image");
        const batch = isSampler ? typedLatentBatch(graph, target) : null;
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
    if (batch !== expected) warnings.push(`latent batch_size ${batch} ≠ ${plural(expected, "panel")}: connect panel_count`);
  }
  return [`${p} · ${c}`, ...warnings].join(" · ");
}

app.registerExtension({
  name: "ConsistentStory.PanelCount",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      const story = this.widgets?.find((w) => w.name === "story");
      if (!story) return;
      const counts = countStory(story.value);
      const batches = latentBatches(this);
      const identity = this.widgets?.find((w) => w.name === "identity_panels");
      const drawn = drawnPanels(this.widgets?.find((w) => w.name === "panels")?.value, counts, Number(identity?.value ?? 2));
      const text = badgeText(counts, batches, drawn);
      const expected = drawn?.count ?? counts.panels;
      const warn = counts.lonely.length || drawn?.error || batches.some((b) => b !== expected);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = warn ? "#e96" : "#9ad";
      ctx.textAlign = "right";
      ctx.fillText(text, this.size[0] - 8, -8);
      ctx.restore();
    };
  },
});
