"""The ComfyUI node classes, exercised without ComfyUI: real tensors, tiny fixture weights, real video files."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import nodes
from infvsr_core.io import VideoReader, VideoWriter
from infvsr_core.weights import WeightFileError
from nodes import comfy, streams
from nodes.audio import SOURCE_KEY, write_audio_file
from nodes.paths import UnsafePathError, next_output_path
from nodes.prompt_queue import MARKER_KEY, QueueBackend
from nodes.streams import REGISTRY
from nodes.types import DAPEGuidance, fork_session
from tests.conftest import make_clip

ROOT = Path(__file__).resolve().parents[1]
FILES = ("InfVSR.ckpt", "Wan2.1_VAE.pth", "ram_swin_large_14m.pth", "DAPE.pth")
H, W = 16, 24  # low-resolution test frames (even, so 4:2:0 video keeps the exact size)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_models):
    """ComfyUI's folders, stand-ins: output, input, temp; models point at the tiny fixtures."""
    base = tmp_path_factory.mktemp("comfy")
    folders = {name: base / name for name in ("output", "input", "temp")}
    for folder in folders.values():
        folder.mkdir()
    comfy.set_directories(models=tiny_models, **folders)
    return folders


@pytest.fixture(scope="module")
def model(dirs):
    (loaded,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32")
    return loaded


@pytest.fixture(scope="module")
def guidance(model):
    reference = make_clip(1, H, W, seed=7)
    return nodes.ExtractDAPEGuidance().extract(model, reference)["result"][0]


def _write_source(path: Path, frames: torch.Tensor, fps: int, audio_dir: Path) -> Path:
    """An h264 mp4 with a 440 Hz stereo AAC track, as a user would drop into the input folder."""
    seconds = frames.shape[0] / fps + 0.5
    t = torch.arange(int(48000 * seconds)) / 48000
    tone = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 660 * t)]) * 0.3
    m4a = write_audio_file({"waveform": tone[None], "sample_rate": 48000}, audio_dir, "mp4")
    with VideoWriter(path, fps, codec="h264", audio_from=m4a) as writer:
        writer.write(frames)
    m4a.unlink()
    return path


@pytest.fixture(scope="module")
def source(dirs):
    """45 frames at 24 fps with audio in the input folder, and the frames as the reader decodes them."""
    path = _write_source(dirs["input"] / "clip.mp4", make_clip(45, H, W, seed=3), 24, dirs["temp"])
    with VideoReader(path) as reader:
        decoded = reader.read_all().frames
    return path, decoded


@pytest.fixture
def queue():
    """A stand-in for ComfyUI's prompt queue; the registry is emptied around each test."""

    class FakeQueue(QueueBackend):
        def __init__(self) -> None:
            self.current: str | None = None
            self.pending: list[tuple[str, str, str]] = []
            self.done: dict[str, str] = {}
            self.cancelled: list[str] = []
            self.count = 0

        def current_prompt_id(self):
            return self.current

        def requeue(self, node_id, marker):
            self.count += 1
            prompt_id = f"run{self.count}"
            self.pending.append((prompt_id, node_id, marker))
            return prompt_id

        def status(self, prompt_id):
            if prompt_id is not None and prompt_id == self.current:
                return "running"
            if any(p[0] == prompt_id for p in self.pending):
                return "pending"
            return self.done.get(prompt_id, "unknown")

        def cancel(self, prompt_id):
            self.pending = [p for p in self.pending if p[0] != prompt_id]
            self.cancelled.append(prompt_id)

    fake = FakeQueue()
    saved = REGISTRY.backend
    REGISTRY.backend = fake
    REGISTRY.streams.clear()
    yield fake
    for stream in list(REGISTRY.streams.values()):
        REGISTRY.finish(stream, "stopped")
    REGISTRY.streams.clear()
    REGISTRY.backend = saved


@pytest.fixture
def hooks():
    yield comfy.progress_hooks
    comfy.progress_hooks.clear()


def interrupt_after(calls: int):
    """A progress hook that raises ComfyUI's interrupt on its `calls`-th call (Cancel pressed mid-run)."""
    seen = {"n": 0}

    def hook(progress: comfy.Progress) -> None:
        seen["n"] += 1
        if seen["n"] == calls:
            raise comfy.InterruptProcessingException()

    return hook


def run_stream_graph(queue, model, guidance, *, frames_per_run: int, fmt: str = "h264-mp4", prefix: str = "s/out"):
    """Drive the streaming workflow (stream loader -> chunk upscale -> combine) the way ComfyUI's queue does.

    Returns the per-run results: (upscaled frames, cache summary, combine result) or the exception raised.
    """
    loader, upscaler, combiner = nodes.InfVSRVideoStream(), nodes.InfVSRChunkUpscale(), nodes.InfVSRVideoCombine()
    prompt: dict = {"1": {"inputs": {}}}
    queue.current = "run0"
    results = []
    while True:
        try:
            out = loader.next_chunk("clip.mp4", frames_per_run, "test", queued_prompt=prompt, unique_id="1")
            if isinstance(out, tuple) and isinstance(out[0], comfy.Blocked):
                results.append("blocked")
            else:
                frames, audio, fps, _info, handle = out["result"]
                up = upscaler.upscale(model, guidance, frames, 4, stream=handle, unique_id="2")
                written = combiner.combine(up["result"][0], fps, prefix, fmt, 18, audio=audio, stream=handle,
                                           unique_id="3")
                results.append((up["result"][0], up["ui"]["infvsr_cache"][0], written))
            queue.done[queue.current] = "success"
        except comfy.InterruptProcessingException as e:
            queue.done[queue.current] = "error"
            results.append(e)
        queue.current = None
        REGISTRY.poll()
        if not queue.pending:
            return results
        prompt_id, node_id, marker = queue.pending.pop(0)
        queue.current = prompt_id
        prompt = {node_id: {"inputs": {MARKER_KEY: marker}}}


def frame_count(path: Path) -> int:
    with VideoReader(path) as reader:
        return sum(len(c) for c in reader.read_chunks(64))


# -- the pack as ComfyUI sees it -----------------------------------------------------------------------


def test_pack_imports_without_comfyui():
    """The repository root loads as ComfyUI loads it (a package named by its path), with no ComfyUI around."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack_x_root', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack_x_root'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'folder_paths' not in sys.modules and 'comfy' not in sys.modules\n"
        "assert 'infvsr_core' not in sys.modules, 'the core must be imported relative to the pack'\n"
        "print(sorted(module.NODE_CLASS_MAPPINGS), module.WEB_DIRECTORY)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "InfVSRVideoStream" in done.stdout and "./web" in done.stdout
    assert (ROOT / "web").is_dir()


@pytest.mark.parametrize("name", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_classic_node_api(name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    assert cls.CATEGORY == "InfVSR" and isinstance(cls.RETURN_TYPES, tuple)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS
    parameters = inspect.signature(getattr(cls(), cls.FUNCTION)).parameters
    for group in spec.values():
        for input_name in group:
            assert input_name in parameters, f"{name}.{cls.FUNCTION} lacks parameter {input_name}"


# -- model and guidance ----------------------------------------------------------------------------------


def test_model_node_loads_the_four_files(model, tiny_pipeline):
    assert model.device.type == "cpu" and not model.idle_weights_on_cpu and model.attention == "auto"
    assert model.model_id == tiny_pipeline.model_id  # the same files and dtype: the same model identity
    choices = nodes.LoadInfVSRModel.INPUT_TYPES()["required"]
    assert choices["dit"][0][0] == "InfVSR.ckpt" and choices["vae"][0][0] == "Wan2.1_VAE.pth"
    (math_model,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", attention="math")
    assert math_model.pipeline.dit.attention_backend == "math"


def test_model_node_seams_choice_sets_the_tiling(model):
    optional = nodes.LoadInfVSRModel.INPUT_TYPES()["optional"]
    assert optional["vae_seams"][0] == ["release", "smooth"] and optional["vae_seams"][1]["default"] == "release"
    # appended last: saved workflows' widget values keep their positions
    assert list(optional)[-4:] == ["vae_seams", "host_memory_gib", "download_missing", "lora"]
    (smooth,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", vae_seams="smooth")
    vae = smooth.pipeline.vae
    assert (vae.tile_size, vae.tile_stride, vae.tile_margin) == (128, 80, 16)
    (release,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32")
    assert (release.pipeline.vae.tile_stride, release.pipeline.vae.tile_margin) == (110, 0)


def test_core_state_offload_gives_the_same_frames(model, guidance):
    """The loader exposes the core's host offload of the stream state (when the core has it): same output."""
    optional = nodes.LoadInfVSRModel.INPUT_TYPES()["optional"]
    if "state_offload" not in optional:
        pytest.skip("this core has no state offload")
    mode = "all" if "all" in optional["state_offload"][0] else optional["state_offload"][0][-1]
    (offloaded,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", state_offload=mode)
    assert offloaded.pipeline.offload == mode and offloaded.model_id == model.model_id
    clip = make_clip(21, H, W, seed=8)
    node = nodes.InfVSRChunkUpscale()
    first = node.upscale(offloaded, guidance, clip[:10], 4, last_chunk=False)
    second = node.upscale(offloaded, guidance, clip[10:], 4, cache=first["result"][1])
    expected = node.upscale(model, guidance, clip, 4)["result"][0]
    assert torch.equal(torch.cat([first["result"][0], second["result"][0]]), expected)


def test_model_moves_only_the_weights_the_core_policy_leaves_on_the_device(model):
    """The idle-weights move (`weights`) leaves the networks the core's offload policy keeps in host memory to
    the core: the DiT with "all", the visual guidance with "state" and "all"."""
    pipe = model.pipeline
    try:
        for mode in ("none", "histories", "state", "all"):
            pipe.offload = mode
            moved = model.modules()
            assert (pipe.dit in moved) == (not pipe.policy.dit_weights_on_host) == (mode != "all")
            assert (pipe.guidance in moved) == (mode in ("none", "histories")) and pipe.vae.vae in moved
    finally:
        pipe.offload = "none"


def test_host_memory_cap_spills_to_the_temp_folder(model, guidance, dirs):
    """host_memory_gib with a state offload: histories past the cap go to files under ComfyUI's temp folder."""
    with pytest.raises(ValueError, match="set state_offload"):
        nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", state_offload="none", host_memory_gib=1.0)
    (capped,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", state_offload="state", host_memory_gib=1e-6)
    spill = capped.pipeline.vae.spill
    assert spill is not None and spill.folder.parent == dirs["temp"] / "infvsr-spill"
    clip = make_clip(21, H, W, seed=8)
    out = nodes.InfVSRChunkUpscale().upscale(capped, guidance, clip, 4)["result"][0]
    assert spill.spilled_bytes > 0
    assert torch.equal(out, nodes.InfVSRChunkUpscale().upscale(model, guidance, clip, 4)["result"][0])


def test_missing_weight_file_names_file_folders_and_source(dirs, tiny_models, tmp_path):
    comfy.set_directories(models=tmp_path)
    try:
        with pytest.raises(WeightFileError) as info:
            nodes.LoadInfVSRModel().load(*FILES)
        message = str(info.value)
        assert "InfVSR.ckpt" in message and str(tmp_path) in message and "github.com/Kai-Liu001/InfVSR" in message
        with pytest.raises(WeightFileError, match="my_dit.safetensors.*searched"):
            nodes.LoadInfVSRModel().load("my_dit.safetensors", *FILES[1:])
    finally:
        comfy.set_directories(models=tiny_models)


def test_guidance_frame_choice(model, tiny_pipeline):
    clip = make_clip(5, H, W, seed=1)
    node = nodes.ExtractDAPEGuidance()
    first = node.extract(model, clip, "first")["result"][0]
    middle = node.extract(model, clip, "middle")["result"][0]
    last = node.extract(model, clip, "index", -1)["result"][0]
    assert torch.equal(first.prompt, tiny_pipeline.extract_prompt(clip[0]))
    assert torch.equal(middle.prompt, tiny_pipeline.extract_prompt(clip[2]))
    assert torch.equal(last.prompt, tiny_pipeline.extract_prompt(clip[4]))
    assert first.model_id == model.model_id and "frame 4 of 5" in last.reference
    with pytest.raises(ValueError, match="outside the batch of 5"):
        node.extract(model, clip, "index", 5)
    with pytest.raises(ValueError, match="empty"):
        node.extract(model, clip[:0])


# -- chunk upscale ---------------------------------------------------------------------------------------


def test_chained_chunks_equal_one_core_run(model, guidance, tiny_pipeline):
    clip = make_clip(33, H, W, seed=5)
    reference = tiny_pipeline.upscale(clip, scale=4, prompt=guidance.prompt)
    node = nodes.InfVSRChunkUpscale()
    a = node.upscale(model, guidance, clip[:7], 4, last_chunk=False)
    b = node.upscale(model, guidance, clip[7:23], 4, last_chunk=False, cache=a["result"][1])
    c = node.upscale(model, guidance, clip[23:], 4, last_chunk=True, cache=b["result"][1])
    pieces = [a["result"][0], b["result"][0], c["result"][0]]
    assert [p.shape[0] for p in pieces] == [0, 21, 12]  # frames wait for whole chunks, the last node flushes
    assert torch.equal(torch.cat(pieces), reference)
    summary = c["ui"]["infvsr_cache"][0]
    assert summary["frames_in"] == summary["frames_out"] == 33 and summary["closed"] and summary["chunks"] == 3
    # ComfyUI may re-run node b alone with a's cached output: a's cache must not have moved.
    again = node.upscale(model, guidance, clip[7:23], 4, last_chunk=False, cache=a["result"][1])
    assert torch.equal(again["result"][0], b["result"][0])
    assert a["result"][1].session.frames_in == 7


def test_fork_shares_tensors_but_not_state(model, guidance):
    node = nodes.InfVSRChunkUpscale()
    cache = node.upscale(model, guidance, make_clip(14, H, W), 4, last_chunk=False)["result"][1]
    fork = fork_session(cache.session)
    assert fork is not cache.session and fork.scene is not cache.session.scene
    assert fork.scene.vae_history.encoder_cache is not cache.session.scene.vae_history.encoder_cache
    assert fork.scene.kv_cache.keys[0] is cache.session.scene.kv_cache.keys[0]  # no tensor copies
    assert fork.state_bytes() == cache.session.state_bytes()


def test_chunk_state_stays_flat_over_many_chunks(model, guidance):
    node = nodes.InfVSRChunkUpscale()
    cache, sizes = None, []
    for i in range(8):
        result = node.upscale(model, guidance, make_clip(12, H, W, seed=i), 4, last_chunk=False, cache=cache)
        cache = result["result"][1]
        sizes.append(cache.session.state_bytes())
    assert len(set(sizes[1:])) == 1, sizes  # constant from the second chunk on: the video may grow forever


def test_chunk_node_bad_inputs(model, guidance, tiny_models):
    node = nodes.InfVSRChunkUpscale()
    cache = node.upscale(model, guidance, make_clip(5, H, W), 4, last_chunk=False)["result"][1]
    with pytest.raises(ValueError, match="frame size changed mid-stream"):
        node.upscale(model, guidance, make_clip(5, H + 2, W), 4, last_chunk=False, cache=cache)
    with pytest.raises(ValueError, match="empty batch"):
        node.upscale(model, guidance, make_clip(5, H, W)[:0], 4)
    with pytest.raises(ValueError, match="scale 2 differs"):
        node.upscale(model, guidance, make_clip(5, H, W), 2, cache=cache)
    foreign = DAPEGuidance(guidance.prompt, "another-model", "frame 0")
    with pytest.raises(ValueError, match="different InfVSR model"):
        node.upscale(model, foreign, make_clip(5, H, W), 4)
    other = nodes.ExtractDAPEGuidance().extract(model, make_clip(1, H, W, seed=99))["result"][0]
    with pytest.raises(ValueError, match="guidance differs"):
        node.upscale(model, other, make_clip(5, H, W), 4, cache=cache)
    closed = node.upscale(model, guidance, make_clip(5, H, W), 4, last_chunk=True, cache=cache)["result"][1]
    with pytest.raises(ValueError, match="has ended"):
        node.upscale(model, guidance, make_clip(5, H, W), 4, cache=closed)
    with pytest.raises(TypeError, match="IMAGE"):
        node.upscale(model, guidance, [1, 2, 3], 4)
    with pytest.raises(TypeError, match="Load InfVSR Model"):
        node.upscale(object(), guidance, make_clip(5, H, W), 4)
    # flushing an open stream with an empty batch is allowed: it is how a chain ends
    flushed = node.upscale(model, guidance, make_clip(5, H, W)[:0], 4, last_chunk=True, cache=cache)
    assert flushed["result"][0].shape == (5, 4 * H, 4 * W, 3)


def test_chunk_node_interrupt_leaves_the_input_cache_usable(model, guidance, hooks):
    node = nodes.InfVSRChunkUpscale()
    cache = node.upscale(model, guidance, make_clip(9, H, W), 4, last_chunk=False)["result"][1]
    before = cache.session.frames_out
    hooks.append(interrupt_after(1))
    with pytest.raises(comfy.InterruptProcessingException):
        node.upscale(model, guidance, make_clip(36, H, W), 4, last_chunk=False, cache=cache)
    hooks.clear()
    assert cache.session.frames_out == before  # the interrupted run worked on a fork


# -- files in and out -------------------------------------------------------------------------------------


def test_load_frames_node_gives_frames_audio_fps_and_vhs_info(source):
    path, decoded = source
    frames, audio, fps, info = nodes.InfVSRLoadVideoFrames().load("clip.mp4", 10, 12)
    assert torch.equal(frames, decoded[10:22])
    assert fps == 24.0 and info["loaded_frame_count"] == 12 and info["source_frame_count"] == 45
    assert info["loaded_width"] == W and info["loaded_height"] == H and info["source_fps"] == 24.0
    assert audio["sample_rate"] == 48000 and audio["waveform"].shape[:2] == (1, 2)
    assert abs(audio["waveform"].shape[2] - 48000 * 12 / 24) <= 1024
    assert audio[SOURCE_KEY]["path"] == str(path)
    with pytest.raises(ValueError, match="no frames from frame 100"):
        nodes.InfVSRLoadVideoFrames().load("clip.mp4", 100, 5)
    with pytest.raises(FileNotFoundError, match="not found in the input folder"):
        nodes.InfVSRLoadVideoFrames().load("missing.mp4", 0, 5)
    with pytest.raises(UnsafePathError):
        nodes.InfVSRLoadVideoFrames().load("../clip.mp4", 0, 5)
    assert nodes.InfVSRLoadVideoFrames.VALIDATE_INPUTS("../x.mp4") is not True
    assert "clip.mp4" in nodes.InfVSRLoadVideoFrames.INPUT_TYPES()["required"]["video"][0]


class _CoreVideo:
    """What ComfyUI's VIDEO objects offer the loaders: a stream source (a path, or bytes in memory)."""

    def __init__(self, source) -> None:
        self.source = source

    def get_stream_source(self):
        return self.source


def test_loaders_accept_core_video(source):
    import io

    path, decoded = source
    by_path = nodes.InfVSRLoadVideoFrames().load("ignored.mp4", 0, 4, video_input=_CoreVideo(str(path)))
    in_memory = nodes.InfVSRLoadVideoFrames().load("ignored.mp4", 0, 4, video_input=_CoreVideo(
        io.BytesIO(path.read_bytes())))
    assert torch.equal(by_path[0], decoded[:4]) and torch.equal(in_memory[0], decoded[:4])


@pytest.mark.parametrize("fmt", ["h264-mp4", "h265-mp4", "prores-422hq-mov", "ffv1-mkv", "png-sequence"])
def test_combine_formats(dirs, fmt):
    frames = make_clip(6, 4 * H, 4 * W, seed=2)
    out = nodes.InfVSRVideoCombine().combine(frames, 24.0, f"fmt/{fmt}", fmt, 20)
    path = Path(out["result"][0])
    assert path.exists() and path.resolve().is_relative_to(dirs["output"].resolve())
    preview = out["ui"]["infvsr_video"][0]
    assert preview["finished"] and preview["frames"] == 6 and preview["subfolder"].startswith("fmt")
    assert (dirs["temp"] / preview["poster"]["filename"]).is_file()
    assert frame_count(path) == 6
    if fmt == "ffv1-mkv":  # lossless: 8-bit RGB exactly
        with VideoReader(path) as reader:
            assert torch.allclose(reader.read_all().frames, (frames * 255).round() / 255, atol=1e-6)
    assert not [p for p in path.parent.iterdir() if ".partial" in p.name]


class _LazyAudio(Mapping):
    """Like VideoHelperSuite's lazy AUDIO: a Mapping (not a dict) that decodes when first read."""

    def __init__(self, waveform: torch.Tensor, rate: int) -> None:
        self._data = {"waveform": waveform, "sample_rate": rate}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_combine_muxes_any_audio(dirs, source):
    frames = make_clip(24, 2 * H, 2 * W)
    tone = torch.sin(torch.arange(44100) / 44100 * 2 * math.pi * 220)[None, None].repeat(1, 2, 1) * 0.5
    node = nodes.InfVSRVideoCombine()
    foreign = node.combine(frames, 24.0, "audio/foreign", "h264-mp4", 23,
                           audio={"waveform": tone, "sample_rate": 44100})
    copied = node.combine(frames, 12.0, "audio/copied", "prores-422hq-mov", 0,
                          audio=nodes.InfVSRLoadVideoFrames().load("clip.mp4", 0, 24)[1],
                          video_info={"loaded_fps": 24.0})
    lazy = node.combine(frames, 24.0, "audio/lazy", "ffv1-mkv", 0, audio=_LazyAudio(tone, 44100))
    for out in (foreign, copied, lazy):
        with VideoReader(out["result"][0]) as reader:
            assert reader.info.has_audio and reader.info.fps == Fraction(24)
        assert out["ui"]["infvsr_video"][0]["has_audio"]
    assert not list(dirs["temp"].glob("infvsr_audio_*"))  # the temporary WAV is gone


def test_output_paths_stay_inside_the_output_folder(dirs, tmp_path):
    node = nodes.InfVSRVideoCombine()
    frames = make_clip(2, H, W)
    for bad in ("../escape", "a/../../escape", "/tmp/abs", "C:/x", "..\\win", ""):
        with pytest.raises(UnsafePathError):
            node.combine(frames, 24.0, bad, "h264-mp4", 18)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (dirs["output"] / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        node.combine(frames, 24.0, "link/x", "h264-mp4", 18)
    assert not list(outside.iterdir()) and not list(tmp_path.glob("escape*"))
    first, _, name1 = next_output_path(dirs["output"], "count/v", "mp4")
    first.write_bytes(b"x")
    _, sub, name2 = next_output_path(dirs["output"], "count/v", "mp4")
    assert (name1, name2, sub) == ("v_00001.mp4", "v_00002.mp4", "count")


# -- the cross-run streaming loop ---------------------------------------------------------------------------


def test_stream_loop_equals_one_core_run_and_stays_flat(queue, model, guidance, source, tiny_pipeline, dirs):
    path, decoded = source
    results = run_stream_graph(queue, model, guidance, frames_per_run=12)
    assert len(results) == 4 and queue.count == 3  # 45 frames, 12 per run: re-queued 3 times, then it ends
    upscaled = torch.cat([r[0] for r in results])
    assert torch.equal(upscaled, tiny_pipeline.upscale(decoded, scale=4, prompt=guidance.prompt))
    sizes = [r[1]["state_bytes"] for r in results[:-1]]
    assert len(set(sizes[1:])) == 1, sizes  # the cache does not grow with the video
    stream = REGISTRY.streams["test"]
    assert stream.state == "done" and not stream.caches and not stream.sinks and stream.reader is None
    output = Path(results[-1][2]["result"][0])
    assert output.is_file() and frame_count(output) == 45
    with VideoReader(output) as reader:
        assert reader.info.has_audio and (reader.info.width, reader.info.height) == (4 * W, 4 * H)
    previews = [r[2]["ui"]["infvsr_video"][0] for r in results]
    assert [p["finished"] for p in previews] == [False, False, False, True]
    assert stream.summary()["chunks"] == 4 and stream.summary()["frames_done"] == 45


def test_stream_cancel_leaves_a_playable_file(queue, model, guidance, source, hooks):
    hooks.append(interrupt_after(3))  # runs 1 and 2 finish one core chunk each (9, 12 frames); Cancel in run 3
    results = run_stream_graph(queue, model, guidance, frames_per_run=12, prefix="s/cancel")
    assert isinstance(results[2], comfy.InterruptProcessingException)
    assert results[3:] == [] and queue.cancelled == ["run3"]  # run 3's queued continuation was removed
    stream = REGISTRY.streams["test"]
    assert stream.state == "interrupted" and not stream.sinks and not stream.caches
    output = dirs_output(stream)
    assert output.is_file() and frame_count(output) == results[0][0].shape[0] + results[1][0].shape[0] == 21
    assert not [p for p in output.parent.iterdir() if ".partial" in p.name]


def dirs_output(stream) -> Path:
    (entry,) = stream.outputs.values()
    return comfy.output_directory() / entry["subfolder"] / entry["filename"]


def test_stream_stop_button_ends_after_the_chunk(queue, model, guidance, source):
    loader = nodes.InfVSRVideoStream()
    queue.current = "run0"
    out = loader.next_chunk("clip.mp4", 12, "test", queued_prompt={"1": {"inputs": {}}}, unique_id="1")
    frames, audio, fps, _info, handle = out["result"]
    assert handle.chunk == 1 and not handle.is_last and len(queue.pending) == 1
    assert REGISTRY.request_stop("test")  # while run 0 is still executing
    assert queue.cancelled == ["run1"] and not queue.pending
    up = nodes.InfVSRChunkUpscale().upscale(model, guidance, frames, 4, stream=handle, unique_id="2")
    nodes.InfVSRVideoCombine().combine(up["result"][0], fps, "s/stop", "h264-mp4", 18, audio=audio, stream=handle,
                                       unique_id="3")
    queue.done["run0"], queue.current = "success", None
    REGISTRY.poll()
    stream = REGISTRY.streams["test"]
    assert stream.state == "stopped" and frame_count(dirs_output(stream)) == 9


def test_stream_run_failing_elsewhere_is_finalized(queue, model, guidance, source):
    """A run that fails outside the InfVSR nodes: the queued continuation finds it and closes the file."""
    loader = nodes.InfVSRVideoStream()
    queue.current = "run0"
    run = loader.next_chunk("clip.mp4", 20, "test", queued_prompt={}, unique_id="1")
    frames, audio, fps, _info, handle = run["result"]
    up = nodes.InfVSRChunkUpscale().upscale(model, guidance, frames, 4, stream=handle, unique_id="2")
    nodes.InfVSRVideoCombine().combine(up["result"][0], fps, "s/fail", "h264-mp4", 18, stream=handle, unique_id="3")
    queue.done["run0"] = "error"  # e.g. a preview node after the combine raised
    prompt_id, node_id, marker = queue.pending.pop(0)
    queue.current = prompt_id
    blocked = loader.next_chunk("clip.mp4", 20, "test", queued_prompt={node_id: {"inputs": {MARKER_KEY: marker}}},
                                unique_id="1")
    assert isinstance(blocked[0], comfy.Blocked)
    stream = REGISTRY.streams["test"]
    assert stream.state == "interrupted" and frame_count(dirs_output(stream)) == up["result"][0].shape[0] == 9
    with pytest.raises(streams.StreamEnded, match="already ended"):
        nodes.InfVSRChunkUpscale().upscale(model, guidance, frames, 4, stream=handle, unique_id="2")


def test_stream_cancel_landing_on_the_next_run_before_its_loader_is_an_interruption(queue, model, guidance, source):
    """ComfyUI's Cancel can reach the queued continuation as it starts, before the stream loader runs (ComfyUI
    clears the interrupt flag when a run starts and checks it before each node): the stream was interrupted, not
    stopped by its queue being cleared."""
    loader = nodes.InfVSRVideoStream()
    queue.current = "run0"
    run = loader.next_chunk("clip.mp4", 10, "test", queued_prompt={}, unique_id="1")
    frames, audio, fps, _info, handle = run["result"]
    queue.done["run0"] = "success"
    prompt_id, _, _ = queue.pending.pop(0)
    queue.current = None
    queue.done[prompt_id] = "error"  # the continuation, interrupted before any InfVSR node
    REGISTRY.poll()
    stream = REGISTRY.by_id(handle.stream_id)
    assert stream.state == "interrupted"


def test_new_run_replaces_a_running_stream_and_orphans_are_polled(queue, model, guidance, source):
    loader = nodes.InfVSRVideoStream()
    queue.current = "run0"
    first = loader.next_chunk("clip.mp4", 10, "test", queued_prompt={}, unique_id="1")["result"][4]
    queue.done["run0"], queue.current = "success", None
    queue.pending.clear()  # the user cleared the queue: nothing will continue the stream
    REGISTRY.poll()
    assert REGISTRY.by_id(first.stream_id).state == "stopped"
    queue.current = "run9"
    second = loader.next_chunk("clip.mp4", 10, "test", queued_prompt={}, unique_id="1")["result"][4]
    assert second.stream_id != first.stream_id and second.chunk == 1
    third = loader.next_chunk("clip.mp4", 10, "test", queued_prompt={}, unique_id="1")["result"][4]
    assert REGISTRY.by_id(second.stream_id) is None and third.chunk == 1  # a fresh queue press restarts


# -- the all-in-one file node -------------------------------------------------------------------------------


def test_upscale_video_file_matches_the_core(dirs, model, guidance, source, tiny_pipeline):
    path, decoded = source
    out = nodes.InfVSRUpscaleVideoFile().upscale_file(
        model, "clip.mp4", 4, "ffv1-mkv", 18, "file/whole", read_frames=20, guidance=guidance, unique_id="5")
    result = Path(out["result"][0])
    expected = tiny_pipeline.upscale(decoded, scale=4, prompt=guidance.prompt)
    with VideoReader(result) as reader:
        got = reader.read_all().frames
        assert reader.info.has_audio
    assert torch.allclose(got, (expected * 255).round() / 255, atol=1e-6)
    assert out["ui"]["infvsr_video"][0]["frames"] == 45


def test_upscale_video_file_cancel_keeps_what_was_finished(dirs, model, source, hooks):
    hooks.append(interrupt_after(3))
    with pytest.raises(comfy.InterruptProcessingException):
        nodes.InfVSRUpscaleVideoFile().upscale_file(model, "clip.mp4", 2, "h264-mp4", 18, "file/cancel",
                                                    read_frames=16)
    (output,) = (dirs["output"] / "file").glob("cancel_*.mp4")
    # Three chunks reported, and the fourth, which completed before the Cancel was seen (a deferred push held
    # it back while the third was written): four finished chunks, playable.
    assert frame_count(output) == 9 + 12 + 12 + 12
    assert not [p for p in output.parent.iterdir() if ".partial" in p.name]


def test_upscale_video_file_with_scene_detection(dirs, model, source):
    out = nodes.InfVSRUpscaleVideoFile().upscale_file(model, "clip.mp4", 2, "h264-mp4", 18, "file/scenes",
                                                      read_frames=16, keep_audio=False, detect_scenes=True,
                                                      start_frame=5, max_frames=30)
    with VideoReader(out["result"][0]) as reader:
        assert not reader.info.has_audio and (reader.info.width, reader.info.height) == (2 * W, 2 * H)
    assert frame_count(Path(out["result"][0])) == 30
