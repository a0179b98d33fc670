// ComfyUI-InfVSR web extension: video preview on the output nodes, stream progress (chunk k of n, fps,
// ETA) with a Stop button on the stream loader, and the cache state on the chunk nodes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "infvsr.progress";
const PREVIEW_NODES = new Set(["InfVSRVideoCombine", "InfVSRUpscaleVideoFile"]);
const STATUS_NODES = new Set(["InfVSRVideoStream", "InfVSRUpscaleVideoFile", "InfVSRChunkUpscale", "ExtractDAPEGuidance"]);

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

function addStatusWidget(node) {
  const root = document.createElement("div");
  root.className = "infvsr-status";
  Object.assign(root.style, { font: "11px sans-serif", color: "var(--descrip-text, #aaa)", padding: "2px 4px",
    boxSizing: "border-box", width: "100%", overflow: "hidden" });
  const text = document.createElement("div");
  text.style.whiteSpace = "pre-wrap";
  text.textContent = "";
  const barOuter = document.createElement("div");
  Object.assign(barOuter.style, { height: "4px", background: "rgba(127,127,127,0.3)", borderRadius: "2px",
    marginTop: "3px", display: "none" });
  const barInner = document.createElement("div");
  Object.assign(barInner.style, { height: "100%", width: "0%", background: "#4caf50", borderRadius: "2px" });
  barOuter.appendChild(barInner);
  root.append(text, barOuter);
  const widget = node.addDOMWidget("infvsr_status", "infvsr_status", root, { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.computeSize = (width) => [width, root.dataset.lines ? 16 * Number(root.dataset.lines) + 10 : 10];
  node.infvsrStatus = {
    set(lines, fraction) {
      text.textContent = lines.join("\n");
      root.dataset.lines = String(lines.length);
      if (fraction == null) { barOuter.style.display = "none"; }
      else { barOuter.style.display = "block"; barInner.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`; }
      node.setDirtyCanvas?.(true, true);
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
}

function addPreviewWidget(node) {
  const root = document.createElement("div");
  Object.assign(root.style, { width: "100%", display: "none", flexDirection: "column", alignItems: "center" });
  const video = document.createElement("video");
  Object.assign(video, { controls: true, loop: true, muted: true, playsInline: true });
  Object.assign(video.style, { width: "100%", maxHeight: "100%", display: "none" });
  const image = document.createElement("img");
  Object.assign(image.style, { width: "100%", objectFit: "contain", display: "none" });
  const caption = document.createElement("div");
  Object.assign(caption.style, { font: "11px sans-serif", color: "var(--descrip-text, #aaa)", padding: "2px" });
  root.append(video, image, caption);
  let aspect = null;
  const widget = node.addDOMWidget("infvsr_preview", "infvsr_preview", root, { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.computeSize = (width) => (aspect ? [width, Math.max(40, (node.size[0] - 20) / aspect + 24)] : [width, -4]);
  const fit = (w, h) => { if (w && h) { aspect = w / h; node.setSize?.([node.size[0], node.computeSize()[1]]); } };
  video.addEventListener("loadedmetadata", () => fit(video.videoWidth, video.videoHeight));
  image.addEventListener("load", () => fit(image.naturalWidth, image.naturalHeight));
  video.addEventListener("error", () => {  // not playable here (ProRes, FFV1, h265 in some browsers): show the still
    video.style.display = "none";
    if (image.dataset.src) { image.src = image.dataset.src; image.style.display = "block"; }
  });
  node.infvsrPreview = (item) => {
    if (!item) return;
    root.style.display = "flex";
    const poster = item.poster ? viewUrl(item.poster) + `&t=${Date.now()}` : null;
    image.dataset.src = poster || "";
    const state = item.finished ? "" : " (writing…)";
    caption.textContent = `${item.subfolder ? item.subfolder + "/" : ""}${item.filename} · ${item.frames} frames · ${item.fps} fps${item.has_audio ? " · audio" : ""}${state}`;
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
  };
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
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      try {
        if (STATUS_NODES.has(name)) addStatusWidget(this);
        if (name === "InfVSRVideoStream") addStopButton(this);
        if (PREVIEW_NODES.has(name)) addPreviewWidget(this);
      } catch (err) {
        console.warn("InfVSR: could not add widgets", err);
      }
    });
    chainCallback(nodeType.prototype, "onExecuted", function (message) {
      try {
        if (message?.infvsr_video?.length && this.infvsrPreview) this.infvsrPreview(message.infvsr_video[0]);
        if (message?.infvsr_cache?.length) showCache(this, message.infvsr_cache[0]);
        if (message?.infvsr_stream?.length) showProgress(this, message.infvsr_stream[0]);
        if (message?.infvsr_guidance?.length && this.infvsrStatus) {
          this.infvsrStatus.set([`reference: ${message.infvsr_guidance[0].reference}`]);
        }
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
