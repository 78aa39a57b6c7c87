// Draws a SIGMAS schedule on the pack's nodes: log(sigma) against step, with a Karras
// schedule of the same length and range overlaid for reference. Nodes opt in by returning
// ui = {"fs_sigmas": [...]}; headless runs never load this file.
import { app } from "../../scripts/app.js";

const PLOT_HEIGHT = 140;

function karras(n, sigmaMin, sigmaMax, rho = 7) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = n === 1 ? 0 : i / (n - 1);
    out.push((sigmaMax ** (1 / rho) + t * (sigmaMin ** (1 / rho) - sigmaMax ** (1 / rho))) ** rho);
  }
  return out;
}

function drawSeries(ctx, values, box, range, color, dash) {
  const n = values.length;
  ctx.strokeStyle = color;
  ctx.setLineDash(dash);
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = box.x + (n === 1 ? 0 : (i / (n - 1)) * box.w);
    const y = box.y + box.h - ((Math.log(v) - range.lo) / (range.hi - range.lo || 1)) * box.h;
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.setLineDash([]);
}

export function drawSigmaPlot(ctx, node, sigmas) {
  const positive = sigmas.filter((s) => s > 0);
  if (positive.length < 1) return;
  const reference = karras(positive.length, Math.min(...positive), Math.max(...positive));
  const logs = positive.map(Math.log);
  const range = { lo: Math.min(...logs), hi: Math.max(...logs) };
  const box = { x: 28, y: node.size[1] - PLOT_HEIGHT + 8, w: node.size[0] - 40, h: PLOT_HEIGHT - 30 };
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(box.x - 4, box.y - 4, box.w + 8, box.h + 8);
  drawSeries(ctx, reference, box, range, "#888", [4, 3]);
  drawSeries(ctx, positive, box, range, "#4fc3f7", []);
  ctx.fillStyle = "#ccc";
  ctx.font = "10px sans-serif";
  ctx.fillText(`log σ: ${positive.length} levels, ${positive[0].toFixed(3)} → ${positive[positive.length - 1].toFixed(4)}`, box.x, box.y + box.h + 14);
  ctx.fillStyle = "#888";
  ctx.fillText("karras", box.x + box.w - 36, box.y + 10);
  ctx.restore();
}

app.registerExtension({
  name: "fs.sigmaPlot",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FS_")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const sigmas = message?.fs_sigmas;
      if (!Array.isArray(sigmas)) return;
      this.fsSigmas = sigmas.map(Number);
      if (this.size[1] < PLOT_HEIGHT + 60) this.setSize([Math.max(this.size[0], 260), this.size[1] + PLOT_HEIGHT]);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.fsSigmas && !this.flags?.collapsed) drawSigmaPlot(ctx, this, this.fsSigmas);
    };
  },
});
