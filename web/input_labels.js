// Consistent Story: the name of a connected multiline input, on the canvas. LiteGraph draws no
// label for a widget's input slot (the widget draws its own name) and ComfyUI hides a multiline
// text box once its input is connected, so nothing named the slot: Comic Page's captions, wired
// from Story Prompts, showed a bare dot (CLIPTextEncode's text does the same). The label is drawn
// where LiteGraph draws the label of a plain input. The Vue nodes mode names the slot itself.
import { app } from "../../scripts/app.js";

const PACK_NODES = "ConsistentStory";
const LABEL_OFFSET = [10, 5]; // from the slot's centre, as LiteGraph places an input's label

function drawConnectedTextLabels(node, ctx) {
  if (app.canvas?.low_quality) return; // LiteGraph hides slot labels then too
  (node.inputs ?? []).forEach((input, slot) => {
    const widget = input.widget && node.widgets?.find((w) => w.name === input.widget.name);
    if (!widget?.element || !node.isInputConnected(slot)) return; // a DOM (multiline) widget, hidden
    const [x, y] = node.getConnectionPos(true, slot);
    ctx.save();
    ctx.font = app.canvas.inner_text_font;
    ctx.fillStyle = window.LiteGraph.NODE_TEXT_COLOR;
    ctx.textAlign = "left";
    ctx.fillText(input.label || input.localized_name || input.name, x - node.pos[0] + LABEL_OFFSET[0],
      y - node.pos[1] + LABEL_OFFSET[1]);
    ctx.restore();
  });
}

app.registerExtension({
  name: "ConsistentStory.InputLabels",
  nodeCreated(node) {
    if (!String(node.comfyClass ?? "").startsWith(PACK_NODES)) return;
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
      const result = draw?.call(this, ctx, ...rest);
      drawConnectedTextLabels(this, ctx);
      return result;
    };
  },
});
