// MixQuant front-end extension: draws the bit allocation on the MixQuant Report node (one bar per block, colored by
// its average weight bits) and the plan's quality/size curve, from the node's ui output ("mixquant_report").
// It also shows the phase of a long run (calibrating / measuring sensitivity / allocating) on the running node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BIT_COLORS = [[2, [214, 69, 65]], [4, [240, 160, 48]], [8, [86, 176, 96]], [16, [90, 120, 170]]];

function bitColor(bits) {
  // piecewise-linear between the anchor colors (2 bits red ... 16 bits blue)
  let lo = BIT_COLORS[0], hi = BIT_COLORS[BIT_COLORS.length - 1];
  for (let i = 0; i < BIT_COLORS.length - 1; i++) {
    if (bits >= BIT_COLORS[i][0] && bits <= BIT_COLORS[i + 1][0]) { lo = BIT_COLORS[i]; hi = BIT_COLORS[i + 1]; break; }
  }
  const f = hi[0] === lo[0] ? 0 : Math.min(1, Math.max(0, (bits - lo[0]) / (hi[0] - lo[0])));
  const c = lo[1].map((v, k) => Math.round(v + f * (hi[1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

const ROW = 14, PAD = 8, CURVE_H = 90;

function drawReport(node, ctx, rep) {
  const top = (node.outputs?.length || 1) * LiteGraph.NODE_SLOT_HEIGHT + 6 + (node.widgets?.length || 0) * 24;
  const width = node.size[0] - 2 * PAD;
  const s = rep.summary || {};
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  const mb = (b) => ((b || 0) / 1e6).toFixed(1);
  ctx.fillText(`avg ${Number(s.avg_w_bits || 0).toFixed(2)} weight bits · ${mb(s.bytes_quantized)} MB of ` +
               `${mb(s.bytes_fp16)} MB fp16`, PAD, top + 10);
  const labelW = Math.min(130, width * 0.45);
  const barW = width - labelW - 40;
  let y = top + 20;
  for (const b of rep.blocks || []) {
    ctx.fillStyle = "#bbb";
    ctx.fillText(b.block, PAD, y + ROW - 4, labelW - 4);
    ctx.fillStyle = "#333";
    ctx.fillRect(PAD + labelW, y + 2, barW, ROW - 4);
    ctx.fillStyle = bitColor(b.avg_w_bits);
    ctx.fillRect(PAD + labelW, y + 2, barW * Math.min(1, b.avg_w_bits / 16), ROW - 4);
    ctx.fillStyle = "#ddd";
    ctx.fillText(`${b.avg_w_bits.toFixed(1)}b`, PAD + labelW + barW + 4, y + ROW - 4);
    y += ROW;
  }
  // legend
  y += 4;
  let x = PAD;
  for (const [bits] of BIT_COLORS) {
    ctx.fillStyle = bitColor(bits);
    ctx.fillRect(x, y, 10, 10);
    ctx.fillStyle = "#bbb";
    ctx.fillText(`${bits} bit`, x + 13, y + 9);
    x += 56;
  }
  y += 18;
  // quality/size curve of the plan (predicted from the cached sensitivities)
  const pts = (rep.curve || []).filter((p) => p.bytes && p.predicted_ssim != null);
  if (pts.length > 1) {
    const xs = pts.map((p) => p.bytes / 1e6), ys = pts.map((p) => p.predicted_ssim);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const px = (v) => PAD + 30 + ((v - x0) / Math.max(1e-9, x1 - x0)) * (width - 40);
    const py = (v) => y + CURVE_H - 14 - ((v - y0) / Math.max(1e-9, y1 - y0)) * (CURVE_H - 24);
    ctx.strokeStyle = "#555";
    ctx.strokeRect(PAD + 28, y, width - 36, CURVE_H - 12);
    ctx.strokeStyle = "#8cf";
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(px(p.bytes / 1e6), py(p.predicted_ssim)) : ctx.moveTo(px(p.bytes / 1e6), py(p.predicted_ssim))));
    ctx.stroke();
    ctx.fillStyle = "#8cf";
    for (const p of pts) ctx.fillRect(px(p.bytes / 1e6) - 2, py(p.predicted_ssim) - 2, 4, 4);
    if (s.bytes_quantized) {  // the chosen plan
      ctx.fillStyle = "#fc6";
      ctx.fillRect(px(s.bytes_quantized / 1e6) - 1, y, 2, CURVE_H - 12);
    }
    ctx.fillStyle = "#bbb";
    ctx.fillText("SSIM", PAD, y + 10);
    ctx.fillText(`${x0.toFixed(0)}–${x1.toFixed(0)} MB`, PAD + 30, y + CURVE_H);
    y += CURVE_H + 4;
  }
  ctx.restore();
  return y + PAD;
}

app.registerExtension({
  name: "MixQuant.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("MixQuant")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.mixquantPhase = null;
      if (message?.mixquant_report?.length) {
        this.mixquantReport = message.mixquant_report[0];
        const rows = (this.mixquantReport.blocks || []).length;
        const h = (this.outputs?.length || 1) * LiteGraph.NODE_SLOT_HEIGHT + 60 + rows * ROW + CURVE_H + 20;
        this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], h)]);
      }
      if (message?.text?.length) this.mixquantText = message.text.join("\n");
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      if (this.mixquantReport) {
        drawReport(this, ctx, this.mixquantReport);
      } else if (this.mixquantPhase || this.mixquantText) {
        ctx.save();
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#ccc";
        const lines = (this.mixquantPhase || this.mixquantText).split("\n");
        const top = this.size[1] - 6 - 14 * lines.length;
        lines.forEach((ln, i) => ctx.fillText(ln, 8, top + 14 * (i + 1), this.size[0] - 16));
        ctx.restore();
      }
    };
  },
  setup() {
    api.addEventListener("mixquant.progress", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node));
      if (!node) return;
      node.mixquantPhase = `${detail.phase}: ${detail.done}/${detail.total}`;
      node.setDirtyCanvas(true, true);
    });
  },
});
