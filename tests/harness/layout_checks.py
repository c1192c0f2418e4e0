"""Whether a graph, as the frontend laid it out, hides a title: a group's title under a node or
inside another group (or wider than its group), a node's title under another node. Boxes are
the frontend's own (node.boundingRect includes the title bar; group titles are measured in
the font LiteGraph draws them with)."""
from __future__ import annotations

# Title bars the graph hides: a group's title under a node or inside another group (or wider
# than its group), a node's title under another node. Boxes as the frontend laid them out.
LAYOUT_JS = """
() => {
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const ctx = document.createElement("canvas").getContext("2d");
  const meets = (a, b) => a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3];
  const holds = (a, b) => a[0] <= b[0] && a[1] <= b[1] && a[0] + a[2] >= b[0] + b[2] && a[1] + a[3] >= b[1] + b[3];
  const nodes = app.graph.nodes.map((n) => ({ name: n.title, box: [...n.boundingRect], title: [n.pos[0], n.pos[1] - T, n.size[0], T] }));
  const groups = (app.graph.groups ?? app.graph._groups).map((g) => {
    const size = g.font_size ?? 24;
    ctx.font = `${size}px Arial`;
    return { name: g.title, box: [g.pos[0], g.pos[1], g.size[0], g.size[1]], text: ctx.measureText(g.title).width + size * 0.5,
             title: [g.pos[0], g.pos[1], g.size[0], g.titleHeight ?? size * 1.4] };
  });
  const hits = [];
  for (const g of groups) {
    if (g.text > g.box[2]) hits.push(`group "${g.name}": title wider than its group`);
    for (const n of nodes) if (meets(g.title, n.box)) hits.push(`group "${g.name}": title under node "${n.name}"`);
    for (const h of groups) if (h !== g && meets(g.title, h.box) && !holds(h.box, g.box)) hits.push(`group "${g.name}": title inside group "${h.name}"`);
  }
  for (const n of nodes) for (const m of nodes) if (m !== n && meets(n.title, m.box)) hits.push(`node "${n.name}": title under node "${m.name}"`);
  return hits;
}
"""


def hidden_titles(page) -> list[str]:
    """One line per title hidden in the graph open in ``page``; empty when none is."""
    return page.evaluate(LAYOUT_JS)
