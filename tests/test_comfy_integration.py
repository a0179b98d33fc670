"""The pack inside a real ComfyUI server: /object_info, every saved workflow through /prompt, the stream loop.

Runs only when `COMFYUI_DIR` names a ComfyUI checkout (kept outside this repository); skipped otherwise.
`COMFYUI_PYTHON` is the interpreter that has ComfyUI's requirements and this pack's (default: this one).
With node, playwright-core and Chromium present (the harness in ../shared/tools/comfy_harness installs them),
every workflow is also loaded in the real frontend and must show no missing nodes and no console errors, read
left to right with nothing overlapping or cut, and show the web extension's status lines and previews inside
their nodes (tests/frontend_ui_check.mjs).

    COMFYUI_DIR=/tmp/comfyui COMFYUI_PYTHON=/tmp/comfy-venv/bin/python python -m pytest tests/test_comfy_integration.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
HARNESS = Path(os.environ.get("COMFY_HARNESS", ROOT.parent / "shared" / "tools" / "comfy_harness"))
PACK_NAME = "ComfyUI-InfVSR"
NODES = {"LoadInfVSRModel", "ExtractDAPEGuidance", "InfVSRChunkUpscale", "InfVSRVideoCombine",
         "InfVSRLoadVideoFrames", "InfVSRVideoStream", "InfVSRUpscaleVideoFile", "InfVSREvaluate"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
INPUT_VIDEO = "infvsr_example.mp4"
FRAMES, H, W = 60, 24, 32  # the example video the workflows name: 60 frames, 32x24, with audio

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout to run the real-server integration test",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 30) -> tuple[int, object]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _write_input_video(path: Path, temp: Path) -> None:
    from infvsr_core.io import VideoWriter
    from nodes.audio import write_audio_file
    from tests.conftest import make_clip

    t = torch.arange(int(48000 * (FRAMES / 24 + 0.5))) / 48000
    tone = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 550 * t)])[None] * 0.3
    audio = write_audio_file({"waveform": tone, "sample_rate": 48000}, temp, "mp4")
    with VideoWriter(path, 24, codec="h264", audio_from=audio) as writer:
        writer.write(make_clip(FRAMES, H, W, seed=11))
    audio.unlink()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server on 127.0.0.1 with this pack, tiny weights in models/infvsr, the example video in input/."""
    from infvsr_core.fixtures import write_fixtures

    run = tmp_path_factory.mktemp("comfy_run")
    for name in ("input", "output", "temp", "user", "custom_nodes", "models/infvsr"):
        (run / name).mkdir(parents=True)
    (run / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    write_fixtures(run / "models" / "infvsr", tiny=True, seed=0)
    _write_input_video(run / "input" / INPUT_VIDEO, run / "temp")
    (run / "extra_model_paths.yaml").write_text(
        f"infvsr_integration:\n  custom_nodes: {run / 'custom_nodes'}\n  infvsr: {run / 'models' / 'infvsr'}\n"
    )
    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    args = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--extra-model-paths-config", str(run / "extra_model_paths.yaml"),
            "--input-directory", str(run / "input"), "--output-directory", str(run / "output"),
            "--temp-directory", str(run / "temp"), "--user-directory", str(run / "user")]
    cli = (Path(COMFYUI_DIR) / "comfy" / "cli_args.py").read_text()
    if "--database-url" in cli:
        args += ["--database-url", f"sqlite:///{run / 'user' / 'comfyui.db'}"]
    if "--disable-api-nodes" in cli:
        args.append("--disable-api-nodes")
    log = open(run / "server.log", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(args, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited early:\n{(run / 'server.log').read_text()[-4000:]}")
            try:
                if _http(url + "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{(run / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "run": run, "port": port}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def object_info(server):
    status, info = _http(server["url"] + "/object_info", timeout=60)
    assert status == 200
    return info


def to_api(workflow: dict) -> dict:
    """The editor's graphToPrompt for these workflows: links, widget values by widget order, no frontend nodes."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        widget_inputs = [i for i in node.get("inputs", []) if i.get("widget")]
        for slot, value in zip(widget_inputs, values, strict=False):
            if slot["name"] != "upload":
                inputs[slot["name"]] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def wait_idle(server, timeout: float = 600) -> None:
    """Until the queue is empty and no InfVSR stream runs (streams re-queue themselves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, queue = _http(server["url"] + "/queue")
        _, streams = _http(server["url"] + "/infvsr/streams")
        busy = queue["queue_running"] or queue["queue_pending"]
        if not busy and not any(s["state"] == "running" for s in streams["streams"]):
            return
        time.sleep(0.5)
    pytest.fail("ComfyUI did not finish in time")


def submit(server, workflow: dict, api: dict) -> str:
    status, reply = _http(server["url"] + "/prompt", {
        "prompt": api, "client_id": uuid.uuid4().hex, "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert status == 200, reply
    return reply["prompt_id"]


def probe(path: Path) -> tuple[int, int, int, bool]:
    from infvsr_core.io import VideoReader

    with VideoReader(path) as reader:
        count = sum(len(c) for c in reader.read_chunks(64))
        return count, reader.info.width, reader.info.height, reader.info.has_audio


def test_object_info_lists_every_node(object_info):
    ours = {name: spec for name, spec in object_info.items() if spec.get("category") == "InfVSR"}
    assert set(ours) == NODES
    assert all(spec["python_module"].endswith(PACK_NAME) for spec in ours.values())
    model = ours["LoadInfVSRModel"]["input"]["required"]
    assert "InfVSR.ckpt" in model["dit"][0] and "Wan2.1_VAE.pth" in model["vae"][0]
    assert INPUT_VIDEO in ours["InfVSRVideoStream"]["input"]["required"]["video"][0]
    assert ours["InfVSRVideoCombine"]["output_node"] and ours["InfVSRUpscaleVideoFile"]["output_node"]
    assert ours["InfVSRVideoStream"]["output"] == ["IMAGE", "AUDIO", "FLOAT", "VHS_VIDEOINFO", "INFVSR_STREAM"]


def test_workflows_are_served_as_templates(server):
    status, templates = _http(server["url"] + "/workflow_templates")
    assert status == 200
    names = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    assert set(templates.get(PACK_NAME, [])) == names
    status, _ = _http(f"{server['url']}/api/workflow_templates/{PACK_NAME}/infvsr_stream_4x.json")
    assert status == 200
    for name in names:  # the template browser's picture of each: NAME.jpg beside NAME.json
        url = f"{server['url']}/api/workflow_templates/{PACK_NAME}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
            assert response.read(3) == b"\xff\xd8\xff"


EXPECTED = {  # workflow -> (output prefix, frames, audio)
    "infvsr_stream_4x": ("InfVSR/stream_4x", FRAMES, True),
    "infvsr_chained_chunks": ("InfVSR/chained_4x", FRAMES, True),
    "infvsr_long_video_file": ("InfVSR/long_4x", FRAMES, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_runs_through_the_http_api(server, object_info, name):
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = to_api(workflow)
    missing = {node["class_type"] for node in api.values()} - set(object_info)
    assert not missing, f"{name} uses node types the server lacks: {missing}"
    first = submit(server, workflow, api)
    wait_idle(server)
    _, history = _http(server["url"] + "/history?max_items=200")
    assert history[first]["status"]["status_str"] == "success", history[first]["status"]
    prefix, frames, audio = EXPECTED[name]
    folder = server["run"] / "output" / Path(prefix).parent
    outputs = sorted(folder.glob(Path(prefix).name + "_*.mp4"))
    assert len(outputs) == 1, outputs
    assert probe(outputs[0]) == (frames, 4 * W, 4 * H, audio)
    assert not [p for p in folder.iterdir() if ".partial" in p.name]
    if name == "infvsr_stream_4x":  # one queue press; the prompt re-queued itself until the video ended
        per_run = next(v["inputs"]["frames_per_run"] for v in api.values() if v["class_type"] == "InfVSRVideoStream")
        runs = [h for h in history.values() if any(n.get("class_type") == "InfVSRVideoStream"
                                                   and n["inputs"].get("stream_name") == "infvsr-stream"
                                                   for n in h["prompt"][2].values())]
        assert len(runs) == math.ceil(FRAMES / per_run) > 1
        assert all(h["status"]["status_str"] == "success" for h in runs)
        _, streams = _http(server["url"] + "/infvsr/streams")
        (stream,) = [s for s in streams["streams"] if s["stream_name"] == "infvsr-stream"]
        assert stream["state"] == "done" and stream["chunks"] == len(runs) and stream["frames_done"] == FRAMES
    combine = [n for n, v in api.items() if v["class_type"] in ("InfVSRVideoCombine", "InfVSRUpscaleVideoFile")]
    ui = history[first]["outputs"] if name != "infvsr_stream_4x" else {}
    for node_id in combine if ui else []:
        assert ui[node_id]["infvsr_video"][0]["finished"]


@pytest.fixture(scope="module")
def demo_clips(server) -> dict[int, str]:
    """Clips of other lengths than the one the workflows name, in the input folder: 21 frames (shorter than two
    InfVSR chunks) and 60; no audio."""
    from infvsr_core.fixtures import write_demo_clip

    return {frames: write_demo_clip(server["run"] / "input" / f"demo_{frames}.mp4", frames, W, H).name
            for frames in (21, 60)}


@pytest.mark.parametrize("frames", [21, 60])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_workflow_runs_on_the_clip_the_user_picks(server, demo_clips, name, frames):
    """What each workflow's note asks for: the clip picked in every `video` widget; nothing else changed."""
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = to_api(workflow)
    prefix = f"InfVSR/picked_{name}_{frames}"
    pickers = [node["inputs"] for node in api.values() if "video" in node["inputs"]]
    assert pickers
    for inputs in pickers:
        inputs["video"] = demo_clips[frames]
        if "stream_name" in inputs:
            inputs["stream_name"] = f"picked-{frames}"
    for node in api.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = prefix
    first = submit(server, workflow, api)
    wait_idle(server)
    _, history = _http(server["url"] + "/history?max_items=400")
    assert history[first]["status"]["status_str"] == "success", history[first]["status"]
    if name == "infvsr_stream_4x":
        _, streams = _http(server["url"] + "/infvsr/streams")
        (stream,) = [s for s in streams["streams"] if s["stream_name"] == f"picked-{frames}"]
        assert stream["state"] == "done" and stream["frames_done"] == frames, stream
    (output,) = (server["run"] / "output").glob(prefix + "_*.mp4")
    assert probe(output) == (frames, 4 * W, 4 * H, False)


def test_evaluate_workflow_runs_on_a_pair_the_user_makes(server):
    """What its note asks for: a clip, its reduction by `evaluate --make-lr`, both picked; the upscaled video and
    the report come out, and the measured frames are the upscaled ones against the clip."""
    from infvsr_core.evaluate.degrade import make_lr
    from infvsr_core.fixtures import write_demo_clip

    frames = 48  # the workflow reads frames 0-47 of each
    original = write_demo_clip(server["run"] / "input" / "pair_hr.mp4", frames, 4 * W, 4 * H)
    reduced = make_lr(original, server["run"] / "input" / "pair_lr.mkv").path
    workflow = json.loads((ROOT / "workflows" / "infvsr_upscale_and_evaluate.json").read_text())
    api = to_api(workflow)
    pickers = {node["inputs"]["video"]: node["inputs"] for node in api.values() if "video" in node["inputs"]}
    assert set(pickers) == {"infvsr_example_lr.mkv", "infvsr_example.mp4"}
    pickers["infvsr_example_lr.mkv"]["video"] = reduced.name
    pickers["infvsr_example.mp4"]["video"] = original.name
    for node in api.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = node["inputs"]["filename_prefix"].replace("InfVSR/", "InfVSR/pair_")
    first = submit(server, workflow, api)
    wait_idle(server)
    _, history = _http(server["url"] + "/history?max_items=400")
    assert history[first]["status"]["status_str"] == "success", history[first]["status"]
    (video,) = (server["run"] / "output" / "InfVSR").glob("pair_evaluated_4x_*.mp4")
    assert probe(video)[:3] == (frames, 4 * W, 4 * H)
    (summary,) = (server["run"] / "output" / "InfVSR").glob("pair_eval*/summary.json")
    report = json.loads(summary.read_text())
    assert report["frames"] == frames and math.isfinite(report["metrics"]["psnr"]["mean"])


def _start_small_stream(server, stream_name: str, prefix: str) -> None:
    """The streaming workflow, 6 frames per run (10 runs), waiting until two runs wrote frames (9 of them)."""
    workflow = json.loads((ROOT / "workflows" / "infvsr_stream_4x.json").read_text())
    api = to_api(workflow)
    loader = next(n for n, v in api.items() if v["class_type"] == "InfVSRVideoStream")
    combine = next(n for n, v in api.items() if v["class_type"] == "InfVSRVideoCombine")
    api[loader]["inputs"].update(frames_per_run=6, stream_name=stream_name)
    api[combine]["inputs"]["filename_prefix"] = prefix
    submit(server, workflow, api)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, streams = _http(server["url"] + "/infvsr/streams")
        mine = [s for s in streams["streams"] if s["stream_name"] == stream_name]
        if mine and mine[0]["chunk"] >= 3:
            return
        time.sleep(0.05)
    pytest.fail(f"stream {stream_name} did not start")


def _check_ended_stream(server, stream_name: str, prefix: str, early_state: str) -> None:
    wait_idle(server)
    _, streams = _http(server["url"] + "/infvsr/streams")
    (stream,) = [s for s in streams["streams"] if s["stream_name"] == stream_name]
    assert stream["state"] in (early_state, "done"), stream  # "done" only if the last chunk won the race
    (output,) = (server["run"] / "output").glob(prefix + "_*.mp4")
    count, width, height, audio = probe(output)
    assert (width, height, audio) == (4 * W, 4 * H, True) and 0 < count <= FRAMES
    assert count == stream["outputs"][0]["frames"]
    if stream["state"] == early_state:
        assert count < FRAMES
    assert not [p for p in output.parent.iterdir() if ".partial" in p.name]


def test_stream_stop_leaves_a_playable_file(server):
    _start_small_stream(server, "stop-test", "InfVSR/stopped")
    status, reply = _http(server["url"] + "/infvsr/streams/stop", {"stream_name": "stop-test"})
    assert status == 200 and reply["stream_name"] == "stop-test"
    _check_ended_stream(server, "stop-test", "InfVSR/stopped", "stopped")


def test_cancel_leaves_a_playable_file(server):
    """ComfyUI's own Cancel (POST /interrupt) in the middle of the queue-run loop."""
    _start_small_stream(server, "cancel-test", "InfVSR/cancelled")
    status, _ = _http(server["url"] + "/interrupt", {})
    assert status == 200
    _check_ended_stream(server, "cancel-test", "InfVSR/cancelled", "interrupted")


def _memory(server) -> dict:
    status, report = _http(server["url"] + "/infvsr/memory")
    assert status == 200, report
    return report


def _infvsr_models(report: dict) -> list[dict]:
    """The InfVSR models of a memory report whose three networks ComfyUI holds (or held) as its models."""
    return [m for m in report["models"] if {n["role"] for n in m["networks"]} == {"dit", "vae", "guidance"}]


def _loads(model: dict) -> int:
    """How many times ComfyUI loaded a model's least loaded network."""
    return min(n["loads"] for n in model["networks"])


def _unloads(model: dict) -> int:
    """How many times ComfyUI unloaded a model's least unloaded network."""
    return min(n["unloads"] for n in model["networks"])


def _unload_models(server) -> dict:
    """The UI's "Unload Models" (POST /free), then the memory report once ComfyUI's worker has acted on it."""
    status, _ = _http(server["url"] + "/free", {"unload_models": True})
    assert status == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        report = _memory(server)
        if not any(entry["infvsr"] for entry in report["loaded"]):
            return report
        time.sleep(0.2)
    pytest.fail(f"ComfyUI still holds InfVSR's networks after Unload Models: {_memory(server)}")


def _run_stream(server, stream_name: str, prefix: str, frames_per_run: int = 12, during=None) -> Path:
    """The streaming workflow to its end (one chunk per queue run); `during(chunk)` is called once after a run
    finished while more are to come. The output file."""
    workflow = json.loads((ROOT / "workflows" / "infvsr_stream_4x.json").read_text())
    api = to_api(workflow)
    loader = next(n for n, v in api.items() if v["class_type"] == "InfVSRVideoStream")
    combine = next(n for n, v in api.items() if v["class_type"] == "InfVSRVideoCombine")
    api[loader]["inputs"].update(frames_per_run=frames_per_run, stream_name=stream_name)
    api[combine]["inputs"]["filename_prefix"] = prefix
    submit(server, workflow, api)
    if during is not None:
        deadline = time.monotonic() + 120
        while True:
            _, streams = _http(server["url"] + "/infvsr/streams")
            mine = [s for s in streams["streams"] if s["stream_name"] == stream_name]
            if mine and mine[0]["state"] == "running" and mine[0]["frames_done"] >= frames_per_run:
                during(mine[0]["chunk"])
                break
            assert time.monotonic() < deadline and not (mine and mine[0]["state"] != "running"), mine
            time.sleep(0.02)
    wait_idle(server)
    _, streams = _http(server["url"] + "/infvsr/streams")
    (stream,) = [s for s in streams["streams"] if s["stream_name"] == stream_name]
    assert stream["state"] == "done" and stream["frames_done"] == FRAMES, stream
    (output,) = (server["run"] / "output").glob(prefix + "_*.mp4")
    return output


def _frames(path: Path) -> torch.Tensor:
    from infvsr_core.io import VideoReader

    with VideoReader(path) as reader:
        return reader.read_all().frames


def test_comfyui_holds_the_networks_and_unload_models_releases_them(server):
    """InfVSR's DiT, VAE and visual guidance are models of ComfyUI's model manager: listed while loaded, unloaded
    (weights on the offload device) by the UI's "Unload Models", loaded back by the next run."""
    _run_stream(server, "memory-held", "InfVSR/memory_held")
    report = _memory(server)
    assert report["managed"] and report["device"] == "cpu"  # --cpu: ComfyUI's load device is the CPU
    listed = {entry["class"] for entry in report["loaded"] if entry["infvsr"]}
    assert {"InfVSRDiT", "InfVSRVAE", "InfVSRGuidance"} <= listed, report
    assert all(entry["loaded_bytes"] == entry["bytes"] > 0 for entry in report["loaded"] if entry["infvsr"])
    loaded = [m for m in _infvsr_models(report) if all(n["loaded"] for n in m["networks"])]
    assert loaded, report

    report = _unload_models(server)
    after = {m["model_id"]: m for m in report["models"]}
    for model in loaded:
        for network in after[model["model_id"]]["networks"]:
            assert not network["loaded"] and network["unloads"] >= 1, network
            assert network["weights_device"] == after[model["model_id"]]["offload_device"] == "cpu"

    _run_stream(server, "memory-reloaded", "InfVSR/memory_reloaded")
    report = _memory(server)
    again = [m for m in report["models"] if m["model_id"] in after and all(n["loaded"] for n in m["networks"])]
    assert again and all(n["loads"] >= 2 for m in again for n in m["networks"]), report


def test_stream_continues_bit_identically_across_an_eviction(server):
    """Unload Models between two queue runs of a stream: its state (KV cache, VAE histories) stays, its weights
    go and come back, and the file equals the one of a run without the eviction, frame for frame."""
    reference = _run_stream(server, "evict-reference", "InfVSR/evict_reference")
    before = {m["model_id"]: m for m in _infvsr_models(_memory(server))}
    evicted_at: list[int] = []

    def evict(chunk: int) -> None:
        """Unload Models while the stream runs: ComfyUI acts on it between two of its runs."""
        evicted_at.append(chunk)
        status, _ = _http(server["url"] + "/free", {"unload_models": True})
        assert status == 200
        deadline = time.monotonic() + 60
        while not any(_unloads(m) > _unloads(before[m["model_id"]])
                      for m in _infvsr_models(_memory(server)) if m["model_id"] in before):
            assert time.monotonic() < deadline, "ComfyUI did not unload InfVSR's networks"
            time.sleep(0.05)

    evicted = _run_stream(server, "evict-run", "InfVSR/evict_run", during=evict)
    assert evicted_at and evicted_at[0] < math.ceil(FRAMES / 12)
    reloaded = [m for m in _infvsr_models(_memory(server)) if m["model_id"] in before
                and _loads(m) > _loads(before[m["model_id"]]) and _unloads(m) > _unloads(before[m["model_id"]])]
    assert reloaded, "the stream's later runs did not load the evicted networks back"
    assert torch.equal(_frames(evicted), _frames(reference))


def _frontend_available() -> bool:
    node_modules = Path(os.environ.get("HARNESS_NODE", "/tmp/comfy-harness-node")) / "node_modules" / "playwright-core"
    return (HARNESS / "screenshot.mjs").is_file() and shutil.which("node") is not None and node_modules.is_dir() and (
        Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists())


@pytest.mark.skipif(not _frontend_available(), reason="the harness's frontend check (node, Chromium) is not installed")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_loads_in_the_real_frontend(server, name, tmp_path):
    done = subprocess.run(
        ["node", str(HARNESS / "screenshot.mjs"), "--server", server["url"], "--workflow",
         str(ROOT / "workflows" / f"{name}.json"), "--out", str(tmp_path / f"{name}.png")],
        capture_output=True, text=True, timeout=240,
    )
    report = json.loads(done.stdout)
    assert report["missing_node_types"] == [] and report["nodes_with_errors"] == []
    assert report["console_errors"] == [] and report["page_errors"] == [], report
    assert not [d for d in report["dialogs"] if "missing" in d.lower()]
    assert not report["http_errors"], report["http_errors"]


def _ui_check(server, name: str, *extra: str) -> dict:
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "frontend_ui_check.mjs"), "--server", server["url"], "--workflow",
         str(ROOT / "workflows" / f"{name}.json"), *extra],
        capture_output=True, text=True, timeout=420,
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0 and "fatal" not in report, report
    return report


@pytest.fixture(scope="module")
def poster(server) -> str:
    """A still in the input folder, for a preview shown while a stream is being written."""
    from PIL import Image

    Image.new("RGB", (4 * W, 4 * H), (200, 80, 40)).save(server["run"] / "input" / "infvsr_poster.png")
    return "infvsr_poster.png"


@pytest.mark.skipif(not _frontend_available(), reason="the harness's frontend check (node, Chromium) is not installed")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_and_extension_read_well_in_the_real_frontend(server, poster, name):
    """Laid out left to right at the frontend's own sizes, no title cut; the extension's status lines and
    previews (with the messages the nodes send) fit their node, in readable text; input and output labelled."""
    report = _ui_check(server, name, "--poster", poster, "--video", INPUT_VIDEO)
    assert report["problems"] == [], report
    assert report["widgets"]["shown"]


@pytest.mark.skipif(not _frontend_available(), reason="the harness's frontend check (node, Chromium) is not installed")
def test_file_workflow_run_from_the_real_frontend_shows_input_progress_and_output(server):
    report = _ui_check(server, "infvsr_long_video_file", "--run", "--prefix", "InfVSR/from_the_page")
    assert report["problems"] == [], report
    assert {"InfVSRUpscaleVideoFile:infvsr_status", "InfVSRUpscaleVideoFile:infvsr_preview"} <= set(
        report["widgets"]["shown"])
    (output,) = (server["run"] / "output").glob("InfVSR/from_the_page_*.mp4")
    assert probe(output) == (FRAMES, 4 * W, 4 * H, True)
