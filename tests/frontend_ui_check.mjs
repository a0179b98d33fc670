#!/usr/bin/env node
// The pack's workflows and web extension in ComfyUI's real frontend (headless Chromium), as an artist sees them.
//
//   node tests/frontend_ui_check.mjs --server URL --workflow wf.json [--poster NAME] [--video NAME] [--run]
//        [--prefix TEXT] [--screenshot FILE]
//
// Loads the workflow, then checks, in the frontend's own geometry (graph units):
//   layout   no two nodes overlap (title bars included), every link runs left to right, no title is cut;
//   widgets  the extension's status lines and previews, shown with the messages the nodes send (--poster: a
//            picture in the input folder for a preview still; --video: a video there for a finished output),
//            fit inside their node, nothing cut or spilling; status text is at least 13 px with a contrast of at
//            least 4.5:1; the file node labels ComfyUI's input preview and its own output, input first;
//   --run    instead of showing messages, queues the workflow from the page (--prefix: its filename_prefix, so that
//            ComfyUI runs the output node again rather than answering from its cache) and checks the result.
// Prints {"problems": [...], ...} on stdout; exit 0 when it could check (problems or not), 2 when it could not.
// Needs playwright-core (HARNESS_NODE, default /tmp/comfy-harness-node) and Chromium (CHROMIUM, /usr/bin/chromium).
import { createRequire } from "module";
import fs from "fs";
import os from "os";
import path from "path";

const HARNESS_NODE = process.env.HARNESS_NODE || "/tmp/comfy-harness-node";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const require = createRequire(path.join(HARNESS_NODE, "package.json"));
const { chromium } = require("playwright-core");

const opt = { server: "http://127.0.0.1:8188", run: false };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i], v = () => process.argv[++i];
  if (a === "--server") opt.server = v().replace(/\/$/, "");
  else if (a === "--workflow") opt.workflow = v();
  else if (a === "--poster") opt.poster = v();
  else if (a === "--video") opt.video = v();
  else if (a === "--run") opt.run = true;
  else if (a === "--prefix") opt.prefix = v();
  else if (a === "--screenshot") opt.screenshot = v();
  else { console.error(`unknown argument ${a}`); process.exit(2); }
}

// In the page: every problem of the loaded graph, in words.
function checkGraph(expectShown) {
  const problems = [];
  const app = window.app;
  const nodes = app.graph.nodes;
  const rect = (n) => Array.from(n.boundingRect);
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const [ax, ay, aw, ah] = rect(nodes[i]), [bx, by, bw, bh] = rect(nodes[j]);
      if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) {
        problems.push(`${nodes[i].type} #${nodes[i].id} overlaps ${nodes[j].type} #${nodes[j].id}`);
      }
    }
  }
  const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links || {});
  for (const link of links) {
    const s = app.graph.getNodeById(link.origin_id), t = app.graph.getNodeById(link.target_id);
    if (s && t && s.pos[0] + s.size[0] >= t.pos[0]) problems.push(`link ${s.type} #${s.id} -> ${t.type} #${t.id} runs right to left`);
  }
  const ctx = document.createElement("canvas").getContext("2d");
  for (const n of nodes) {
    ctx.font = n.titleFontStyle;
    const available = n.size[0] - 2 * LiteGraph.NODE_TITLE_HEIGHT;
    if (ctx.measureText(n.getTitle()).width > available) problems.push(`the title '${n.getTitle()}' of #${n.id} is cut`);
  }
  const channels = (css) => (css.match(/[\d.]+/g) || []).slice(0, 3).map(Number);
  const luminance = (css) => {
    const [r, g, b] = channels(css).map((c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const contrast = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const shown = [];
  for (const n of nodes) {
    for (const w of n.widgets || []) {
      if (w.name !== "infvsr_status" && w.name !== "infvsr_preview") continue;
      const el = w.element;
      if (!el || getComputedStyle(el).display === "none") continue;
      shown.push(`${n.type}:${w.name}`);
      const bottom = w.y + (w.computedHeight ?? 0);
      if (bottom > n.size[1] + 1) problems.push(`${w.name} of ${n.type} #${n.id} ends at ${bottom.toFixed(0)}, below the node (${n.size[1].toFixed(0)})`);
      if (el.scrollHeight > el.clientHeight + 1) problems.push(`${w.name} of ${n.type} #${n.id} is cut: content ${el.scrollHeight} px in ${el.clientHeight} px`);
      if (w.name === "infvsr_status") {
        const style = getComputedStyle(el);
        if (parseFloat(style.fontSize) < 13) problems.push(`status text of ${n.type} is ${style.fontSize}`);
        const ratio = contrast(style.color, style.backgroundColor);
        if (ratio < 4.5) problems.push(`status text of ${n.type} has a contrast of ${ratio.toFixed(2)}:1`);
        if (!el.textContent.trim()) problems.push(`status of ${n.type} is shown empty`);
      }
    }
    const output = n.type === "InfVSRUpscaleVideoFile" && n.widgets.find((w) => w.name === "infvsr_preview");
    if (output && getComputedStyle(output.element).display !== "none") {  // the input and the result, both shown
      const names = n.widgets.map((w) => w.name);
      const input = n.widgets.find((w) => w.name === "video-preview");
      if (!input) problems.push("the file node shows no input preview");
      else if (input.y >= output.y || names.indexOf("video-preview") > names.indexOf("infvsr_preview")) problems.push("the file node shows its output above the input");
      if (n.videoContainer?.dataset?.infvsrLabel !== "Input") problems.push("the file node's input preview has no label");
      if (!output.element.querySelector("[data-infvsr-label]")?.dataset.infvsrLabel) problems.push("the file node's output has no label");
    }
  }
  for (const wanted of expectShown) if (!shown.includes(wanted)) problems.push(`${wanted} is not shown`);
  return { problems, shown };
}

const summary = { workflow: opt.workflow, problems: [] };
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "infvsr-ui-"));
let ctx, code = 2;
try {
  const wf = JSON.parse(fs.readFileSync(opt.workflow, "utf8"));
  for (const [k, v] of Object.entries({ "Comfy.TutorialCompleted": true, "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": false })) {
    await fetch(`${opt.server}/api/settings/${k}`, { method: "POST", body: JSON.stringify(v) });
  }
  ctx = await chromium.launchPersistentContext(userDataDir, { executablePath: CHROMIUM, headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"], viewport: { width: 1600, height: 1000 } });
  const origin = new URL(opt.server).origin;
  await ctx.route("**/*", (route) => {
    const u = route.request().url();
    return u.startsWith(origin) || u.startsWith(origin.replace(/^http/, "ws")) || u.startsWith("data:") || u.startsWith("blob:")
      ? route.continue() : route.abort("blockedbyclient");
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => { if (/infvsr/i.test(String(e.stack))) pageErrors.push(String(e.stack).split("\n").slice(0, 3).join(" | ")); });
  page.on("console", (m) => { if (m.type() === "warning" && m.text().startsWith("InfVSR")) pageErrors.push(m.text()); });
  await page.goto(`${opt.server}/`, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 120000 });
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf, true, true, "check"); }, wf);
  await page.waitForTimeout(1500);
  summary.layout = await page.evaluate(checkGraph, []);

  let expect = [];
  if (opt.run) {
    const queued = await page.evaluate(async (prefix) => {
      for (const n of window.app.graph.nodes) {
        const widget = prefix && n.widgets?.find((w) => w.name === "filename_prefix");
        if (widget) widget.value = prefix;
      }
      const { output, workflow } = await window.app.graphToPrompt();
      return await window.app.api.queuePrompt(0, { output, workflow });  // what the Run button sends
    }, opt.prefix ?? null);
    const deadline = Date.now() + 300000;
    for (;;) {  // until the queue is empty and no stream re-queues itself
      await page.waitForTimeout(1000);
      const idle = await page.evaluate(async () => {
        const q = await (await fetch("/queue")).json();
        const s = await (await fetch("/infvsr/streams")).json();
        return !q.queue_running.length && !q.queue_pending.length && !s.streams.some((x) => x.state === "running");
      });
      if (idle) break;
      if (Date.now() > deadline) throw new Error("the workflow did not finish in 300 s");
    }
    const history = await page.evaluate(async (id) => (await (await fetch(`/history/${id}`)).json())[id], queued.prompt_id);
    summary.run = history?.status;
    if (history?.status?.status_str !== "success") {
      const error = (history?.status?.messages || []).find(([kind]) => kind === "execution_error");
      summary.problems.push(`the run did not succeed: ${error ? error[1].exception_message : JSON.stringify(history?.status)}`);
    }
    // the output nodes ran (their prefix is new); nodes above them may have been answered from ComfyUI's cache
    expect = wf.nodes.filter((n) => ["InfVSRVideoCombine", "InfVSRUpscaleVideoFile"].includes(n.type)).map((n) => `${n.type}:infvsr_preview`)
      .concat(wf.nodes.filter((n) => n.type === "InfVSRUpscaleVideoFile").map(() => "InfVSRUpscaleVideoFile:infvsr_status"));
  } else {
    expect = await page.evaluate(({ poster, video }) => {
      const long = "running: reading the next chunk of a clip with a rather long name that must wrap";
      const messages = {
        ExtractDAPEGuidance: { infvsr_guidance: [{ reference: "frame 0 of 1 (the first frame of the clip picked above)", tokens: 77 }] },
        InfVSRChunkUpscale: { infvsr_cache: [{ frames_in: 12, frames_out: 9, pending: 3, state_bytes: 123456789, chunks: 1, scenes: 1, closed: false }] },
        InfVSRVideoStream: { infvsr_stream: [{ stream_name: "infvsr-stream", state: "running", message: long, chunk: 3, chunks: 5,
          frames_done: 36, frames_total: 60, fps: 12.5, eta: 2, state_bytes: 1e8, outputs: [] }] },
        InfVSRVideoCombine: { infvsr_video: [{ filename: "stream_4x_00001.mp4", subfolder: "InfVSR", type: "output", format: "video/mp4",
          finished: false, frames: 36, fps: 24, has_audio: true, poster: { filename: poster, subfolder: "", type: "input" } }] },
        InfVSRUpscaleVideoFile: { infvsr_video: [{ filename: video, subfolder: "", type: "input", format: "video/mp4",
          finished: true, frames: 60, fps: 24, has_audio: true }] },
      };
      const shown = [];
      for (const n of window.app.graph.nodes) {
        const message = messages[n.type];
        if (!message) continue;
        n.onExecuted(message);
        shown.push(`${n.type}:${message.infvsr_video ? "infvsr_preview" : "infvsr_status"}`);
      }
      window.app.graph.setDirtyCanvas(true, true);
      return shown;
    }, { poster: opt.poster, video: opt.video });
  }
  await page.waitForTimeout(2500);  // pictures and videos load, the canvas lays the nodes out again
  summary.widgets = await page.evaluate(checkGraph, expect);
  if (opt.screenshot) {
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
    await page.waitForTimeout(800);
    await page.screenshot({ path: opt.screenshot });
  }
  summary.page_errors = pageErrors;
  summary.problems = [...summary.problems, ...summary.layout.problems, ...summary.widgets.problems, ...pageErrors];
  code = 0;
} catch (e) {
  summary.fatal = String(e && e.stack ? e.stack : e).split("\n").slice(0, 6).join(" | ");
} finally {
  if (ctx) await ctx.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(summary, null, 2));
process.exit(code);
