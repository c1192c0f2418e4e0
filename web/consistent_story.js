// Consistent Story: a live "N panels · M characters" badge on the Story Prompts node, so users
// can see, while typing, how many latents the sampler needs (wire panel_count to batch_size).
// A character that no panel shows alone has no identity panel for Consistent Self-Attention:
// the badge names it ("[Mia] never alone") before the run would fail on it.
// The rule mirrors nodes/story_prompts.py: a line is a character definition when it starts with
// the only tag on the line, names a character not defined before, is not [NC] and has no '#'.
// The Python parser stays the authority: it raises the real errors when the prompt runs.
import { app } from "../../scripts/app.js";

const NODE_ID = "ConsistentStoryPrompts";
const TAG = /\[([^\[\]]*)\]/g;

export function countStory(text) {
  const defined = new Set();
  const alone = new Set();
  let panels = 0;
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
    if (shown.size === 1) alone.add([...shown][0]);
  }
  const lonely = [...defined].filter((name) => !alone.has(name));
  return { panels, characters: defined.size, lonely };
}

function badgeText({ panels, characters, lonely }) {
  const p = `${panels} panel${panels === 1 ? "" : "s"}`;
  const c = `${characters} character${characters === 1 ? "" : "s"}`;
  const warning = lonely.length ? ` · ${lonely.map((n) => `[${n}]`).join(", ")} never alone` : "";
  return `${p} · ${c}${warning}`;
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
      const text = badgeText(counts);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = counts.lonely.length ? "#e96" : "#9ad";
      ctx.textAlign = "right";
      ctx.fillText(text, this.size[0] - 8, -8);
      ctx.restore();
    };
  },
});
