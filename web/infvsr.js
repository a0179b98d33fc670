// ComfyUI-InfVSR web extension: video preview on the output nodes, stream progress (chunk k of n, fps,
// ETA) with a Stop button on the stream loader, and the cache state on the chunk nodes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "infvsr.progress";
const PREVIEW_NODES = new Set(["InfVSRVideoCombine", "InfVSRUpscaleVideoFile"]);
const STATUS_NODES = new Set(["InfVSRVideoStream", "InfVSRUpscaleVideoFile", "InfVSRChunkUpscale", "ExtractDAPEGuidance"]);
// The file node shows ComfyUI's own preview of the picked input and our player of the result: both get a label.
const OUTPUT_LABELS = { InfVSRUpscaleVideoFile: "Upscaled output", InfVSRVideoCombine: "Output" };
const INPUT_LABEL = "Input";

// Text on the nodes: the size of the node's own widget text, in the theme's input colours (light on dark in the
// dark themes, dark on light in the light one), on the widget background, so it reads like the node's widgets.
const FONT_SIZE = 13;
const LINE_HEIGHT = 18;
const FONT = `${FONT_SIZE}px Arial, Helvetica, sans-serif`;
const TEXT_COLOR = "var(--input-text, #ddd)";
const TEXT_BACKGROUND = "var(--comfy-input-bg, #222)";
const PAD_X = 8;
const PAD_Y = 4;
const BAR_HEIGHT = 4;
const BAR_GAP = 4;
const CAPTION_GAP = 4;
const MAX_MEDIA_HEIGHT = 512;  // a portrait video must not make the node taller than a screen
// The frontend lays a DOM widget out in computeSize()[1] + 4 pixels and insets the element by its margin on every
// side: a widget whose content is H pixels tall asks for H + 2 * margin - 4.
const LAYOUT_EXTRA = 4;

function viewUrl(item) {
  const params = new URLSearchParams({ filename: item.filename, subfolder: item.subfolder || "", type: item.type || "output" });
  return api.apiURL(`/view?${params.toString()}`);
}

function formatSeconds(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`;
}

function formatBytes(bytes) {
  if (!bytes) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0, v = bytes;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

let measureContext = null;
function textWidth(text) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = FONT;
  return measureContext.measureText(text).width;
}

// Word-wraps `text` to `maxWidth` pixels (FONT); a word wider than a line is cut where it must be. The element shows
// exactly these lines (white-space: pre), so the height asked for is the height drawn.
function wrapText(text, maxWidth) {
  const out = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (let word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (textWidth(candidate) <= maxWidth) { line = candidate; continue; }
      if (line) out.push(line);
      while (word.length > 1 && textWidth(word) > maxWidth) {
        let cut = word.length - 1;
        while (cut > 1 && textWidth(word.slice(0, cut)) > maxWidth) cut--;
        out.push(word.slice(0, cut));
        word = word.slice(cut);
      }
      line = word;
    }
    out.push(line);
  }
  return out;
}

// Wrapped lines for a width, recomputed only when the text or the width changes (layout asks on every frame).
function wrapper(element) {
  let key = null, lines = [];
  return (text, width) => {
    const k = `${width}\u0000${text}`;
    if (k !== key) {
      key = k;
      lines = text ? wrapText(text, Math.max(8, width)) : [];
      element.textContent = lines.join("\n");
    }
    return lines.length;
  };
}

function textBox(extra = {}) {
  const element = document.createElement("div");
  Object.assign(element.style, { font: FONT, lineHeight: `${LINE_HEIGHT}px`, color: TEXT_COLOR, whiteSpace: "pre",
    overflow: "hidden", ...extra });
  return element;
}

function widgetMargin(widget) {
  return widget.margin ?? 10;
}

function installStyles() {
  if (document.getElementById("infvsr-styles")) return;
  const style = document.createElement("style");
  style.id = "infvsr-styles";
  style.textContent = `
[data-infvsr-label]::before {
  content: attr(data-infvsr-label); position: absolute; top: 4px; left: 4px; z-index: 1; pointer-events: none;
  font: 600 12px/16px Arial, Helvetica, sans-serif; color: #fff; background: rgba(0, 0, 0, 0.7);
  padding: 1px 6px; border-radius: 4px;
}`;
  document.head.appendChild(style);
}

// Our widgets (serialize: false) stay after every widget that has a value, so that saved widget values keep their
// positions, and after ComfyUI's own input preview, so that a node reads top to bottom: settings, input, progress,
// result.
function keepOursLast(node) {
  const widgets = node.widgets;
  if (!widgets) return;
  const ours = widgets.filter((w) => w.infvsrOrder != null).sort((a, b) => a.infvsrOrder - b.infvsrOrder);
  const rest = widgets.filter((w) => w.infvsrOrder == null);
  if (ours.every((w, i) => widgets[rest.length + i] === w)) return;
  widgets.splice(0, widgets.length, ...rest, ...ours);
}

// Sizes the node to its content: taller when the content needs it, and back to fit when the content shrinks,
// unless the user resized the node since we last did.
function fitNode(node) {
  const needed = node.computeSize?.()[1];
  if (!needed || !node.setSize) return;
  const ours = node.infvsrFitHeight != null && Math.abs(node.size[1] - node.infvsrFitHeight) < 1;
  if (needed > node.size[1] || (ours && needed !== node.size[1])) {
    node.setSize([node.size[0], needed]);
    node.infvsrFitHeight = node.size[1];
  }
  node.setDirtyCanvas?.(true, true);
}

function addStatusWidget(node) {
  const root = textBox({ background: TEXT_BACKGROUND, borderRadius: "6px", padding: `${PAD_Y}px ${PAD_X}px`,
    boxSizing: "border-box", display: "none", whiteSpace: "normal" });
  root.className = "infvsr-status";
  const text = textBox();
  const barOuter = document.createElement("div");
  Object.assign(barOuter.style, { height: `${BAR_HEIGHT}px`, marginTop: `${BAR_GAP}px`, borderRadius: "2px",
    background: "rgba(127,127,127,0.35)", display: "none" });
  const barInner = document.createElement("div");
  Object.assign(barInner.style, { height: "100%", width: "0%", background: "#4caf50", borderRadius: "2px" });
  barOuter.appendChild(barInner);
  root.append(text, barOuter);
  const widget = node.addDOMWidget("infvsr_status", "infvsr_status", root, { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.infvsrOrder = 0;
  const wrap = wrapper(text);
  let content = "", withBar = false;
  widget.computeSize = (width) => {
    const w = width ?? node.size[0];
    if (!content) return [w, -LAYOUT_EXTRA];
    const margin = widgetMargin(widget);
    const lines = wrap(content, node.size[0] - 2 * margin - 2 * PAD_X);
    const height = lines * LINE_HEIGHT + 2 * PAD_Y + (withBar ? BAR_GAP + BAR_HEIGHT : 0);
    return [w, height + 2 * margin - LAYOUT_EXTRA];
  };
  node.infvsrStatus = {
    set(lines, fraction) {
      content = lines.join("\n");
      withBar = fraction != null;
      root.style.display = content ? "block" : "none";
      barOuter.style.display = withBar ? "block" : "none";
      if (withBar) barInner.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
      keepOursLast(node);
      fitNode(node);
    },
  };
  return widget;
}

function addStopButton(node) {
  const widget = node.addWidget("button", "stop stream", null, async () => {
    const streamName = node.widgets?.find((w) => w.name === "stream_name")?.value ?? "infvsr";
    try {
      const res = await api.fetchApi("/infvsr/streams/stop", { method: "POST", body: JSON.stringify({ stream_name: streamName }) });
      const data = await res.json();
      node.infvsrStatus?.set([data.stopping ? `stopping '${streamName}' after this chunk…` : `no running stream '${streamName}'`]);
    } catch (err) {
      console.warn("InfVSR: stop failed", err);
    }
  });
  widget.serialize = false;
  widget.infvsrOrder = 1;
}

function addPreviewWidget(node, label) {
  const root = document.createElement("div");
  root.className = "infvsr-preview";
  Object.assign(root.style, { display: "none", flexDirection: "column", overflow: "hidden", boxSizing: "border-box" });
  const media = document.createElement("div");
  media.className = "infvsr-preview-media";
  if (label) media.dataset.infvsrLabel = label;
  Object.assign(media.style, { position: "relative", width: "100%", height: "0px", flex: "none", overflow: "hidden" });
  const video = document.createElement("video");
  Object.assign(video, { controls: true, loop: true, muted: true, playsInline: true });
  Object.assign(video.style, { width: "100%", height: "100%", objectFit: "contain", display: "none" });
  const image = document.createElement("img");
  Object.assign(image.style, { width: "100%", height: "100%", objectFit: "contain", display: "none" });
  media.append(video, image);
  const caption = textBox({ marginTop: `${CAPTION_GAP}px`, flex: "none" });
  root.append(media, caption);
  let aspect = null, captionText = "", shown = false;
  const wrap = wrapper(caption);
  const widget = node.addDOMWidget("infvsr_preview", "infvsr_preview", root, { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.infvsrOrder = 2;
  widget.computeSize = (width) => {
    const w = width ?? node.size[0];
    if (!shown) return [w, -LAYOUT_EXTRA];
    const margin = widgetMargin(widget);
    const inner = node.size[0] - 2 * margin;
    const mediaHeight = aspect ? Math.round(Math.min(MAX_MEDIA_HEIGHT, inner / aspect)) : 0;
    media.style.height = `${mediaHeight}px`;
    const lines = wrap(captionText, inner);
    return [w, mediaHeight + CAPTION_GAP + lines * LINE_HEIGHT + 2 * margin - LAYOUT_EXTRA];
  };
  const fit = (w, h) => {
    if (w && h) aspect = w / h;
    fitNode(node);
  };
  video.addEventListener("loadedmetadata", () => fit(video.videoWidth, video.videoHeight));
  image.addEventListener("load", () => fit(image.naturalWidth, image.naturalHeight));
  video.addEventListener("error", () => {  // not playable here (ProRes, FFV1, h265 in some browsers): show the still
    video.style.display = "none";
    if (image.dataset.src) { image.src = image.dataset.src; image.style.display = "block"; }
  });
  node.infvsrPreview = (item) => {
    if (!item) return;
    shown = true;
    root.style.display = "flex";
    const poster = item.poster ? viewUrl(item.poster) + `&t=${Date.now()}` : null;
    image.dataset.src = poster || "";
    const state = item.finished ? "" : " (writing…)";
    captionText = `${item.subfolder ? item.subfolder + "/" : ""}${item.filename} · ${item.frames} frames · ${item.fps} fps${item.has_audio ? " · audio" : ""}${state}`;
    if (item.sequence) {
      video.style.display = "none";
      image.src = viewUrl(item);
      image.style.display = "block";
    } else if (item.finished && item.format && item.format.startsWith("video/")) {
      image.style.display = "none";
      video.style.display = "block";
      video.src = viewUrl(item);
      video.play?.().catch(() => {});
    } else if (poster) {
      video.style.display = "none";
      image.src = poster;
      image.style.display = "block";
    }
    keepOursLast(node);
    fitNode(node);
  };
}

// ComfyUI's preview of the picked input video (the frontend's `video-preview` widget, made when the file loads).
function labelInputPreview(node) {
  const container = node.videoContainer;
  if (container && container.dataset?.infvsrLabel !== INPUT_LABEL) container.dataset.infvsrLabel = INPUT_LABEL;
}

function showCache(node, cache) {
  if (!cache || !node.infvsrStatus) return;
  const lines = [
    `cache: ${cache.frames_in} in · ${cache.frames_out} out · ${cache.pending} waiting`,
    `state ${formatBytes(cache.state_bytes)} · ${cache.chunks} step(s) · scene ${cache.scenes}${cache.closed ? " · ended" : ""}`,
  ];
  node.infvsrStatus.set(lines);
}

function showProgress(node, p) {
  if (!node?.infvsrStatus || !p) return;
  const of = p.chunks ? `${p.chunk} of ${p.chunks}` : `${p.chunk}`;
  const frames = p.frames_total ? `${p.frames_done}/${p.frames_total} frames` : `${p.frames_done} frames`;
  const lines = [`${p.stream_name ? `stream '${p.stream_name}' · ` : ""}${p.state}${p.message ? `: ${p.message}` : ""}`,
    `chunk ${of} · ${frames}`,
    `${p.fps ? p.fps.toFixed(2) : "–"} fps · ETA ${p.state === "running" ? formatSeconds(p.eta) : "–"}`];
  if (p.state_bytes) lines.push(`cache state ${formatBytes(p.state_bytes)}`);
  const fraction = p.frames_total ? p.frames_done / p.frames_total : null;
  node.infvsrStatus.set(lines, fraction);
  const output = (p.outputs || []).find((o) => o && o.finished);
  if (output && node.infvsrPreview) node.infvsrPreview(output);
}

function showGuidance(node, guidance) {
  if (!guidance || !node.infvsrStatus) return;
  const lines = [`reference: ${guidance.reference}`];
  if (guidance.tokens) lines.push(`visual prompt: ${guidance.tokens} tokens`);
  node.infvsrStatus.set(lines);
}

function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const result = original?.apply(this, args);
    callback.apply(this, args);
    return result;
  };
}

app.registerExtension({
  name: "InfVSR.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (!STATUS_NODES.has(name) && !PREVIEW_NODES.has(name)) return;
    installStyles();
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      try {
        if (STATUS_NODES.has(name)) addStatusWidget(this);
        if (name === "InfVSRVideoStream") addStopButton(this);
        if (PREVIEW_NODES.has(name)) addPreviewWidget(this, OUTPUT_LABELS[name]);
      } catch (err) {
        console.warn("InfVSR: could not add widgets", err);
      }
    });
    if (name === "InfVSRUpscaleVideoFile") {
      chainCallback(nodeType.prototype, "onDrawForeground", function () {
        labelInputPreview(this);
      });
    }
    chainCallback(nodeType.prototype, "onExecuted", function (message) {
      try {
        if (message?.infvsr_video?.length && this.infvsrPreview) this.infvsrPreview(message.infvsr_video[0]);
        if (message?.infvsr_cache?.length) showCache(this, message.infvsr_cache[0]);
        if (message?.infvsr_stream?.length) showProgress(this, message.infvsr_stream[0]);
        if (message?.infvsr_guidance?.length) showGuidance(this, message.infvsr_guidance[0]);
      } catch (err) {
        console.warn("InfVSR: could not show the result", err);
      }
    });
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      try {
        showProgress(findNode(detail?.node), detail);
      } catch (err) {
        console.warn("InfVSR: progress update failed", err);
      }
    });
    await showKnownStreams();
  },
  async afterConfigureGraph() {
    await showKnownStreams();  // a workflow was loaded: show the state of streams its loaders run
  },
});

function findNode(id) {
  if (id == null || !app.graph) return null;
  return app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id);
}

async function showKnownStreams() {
  try {  // streams the server knows (e.g. the page was reloaded mid-stream)
    const res = await api.fetchApi("/infvsr/streams");
    if (!res.ok) return;
    const { streams } = await res.json();
    for (const s of streams || []) {
      const node = findNode(s.node);
      const streamName = node?.widgets?.find((w) => w.name === "stream_name")?.value;
      if (node?.comfyClass === "InfVSRVideoStream" && streamName === s.stream_name) showProgress(node, s);
    }
  } catch (err) {
    console.warn("InfVSR: could not read the stream list", err);
  }
}
