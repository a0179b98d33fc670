"""The command line end to end on tiny fixture weights."""

from fractions import Fraction

import av
import numpy as np
import pytest

from infvsr_core import cli
from infvsr_core.scene_stream import SceneStream
from tests.conftest import make_clip


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """A 24-frame 32x24 h264 clip at 12 fps with a 440 Hz AAC track of the same length."""
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    frames = (make_clip(24, 24, 32, seed=5).numpy() * 255).round().astype(np.uint8)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=12)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv444p"
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "mono"
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        t = np.arange(48000 * 2) / 48000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for k in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, k : k + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, k
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return path


def read(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        has_audio = bool(container.streams.audio)
        audio_seconds = None
        if has_audio:
            a = container.streams.audio[0]
            audio_seconds = float(a.duration * a.time_base) if a.duration else None
        return frames, Fraction(stream.average_rate), has_audio, audio_seconds


def test_upscale_end_to_end_with_audio(small_clip, tiny_models, tmp_path, capsys):
    out = tmp_path / "up.mp4"
    code = cli.main(["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--scale", "2"])
    assert code == 0, capsys.readouterr().err
    frames, fps, has_audio, audio_seconds = read(out)
    assert len(frames) == 24 and frames[0].shape == (48, 64, 3)
    assert fps == 12
    assert has_audio and audio_seconds == pytest.approx(2.0, abs=0.05)
    assert "wrote" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name != "up.mp4"]  # no temp file left behind


def test_offload_gives_the_same_file(small_clip, tiny_models, tmp_path):
    """--offload keeps state in host memory (on the CPU: other tensors); the written frames are identical."""
    outs = []
    for mode in ("none", "state"):
        out = tmp_path / f"{mode}.mkv"
        args = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--scale", "2"]
        assert cli.main([*args, "--offload", mode, "--codec", "ffv1", "--quiet", "--no-audio"]) == 0
        outs.append(read(out)[0])
    assert len(outs[0]) == 24 and all((a == b).all() for a, b in zip(*outs, strict=True))


def test_offload_choices_are_the_policys_modes():
    """The parser names the modes without importing torch; they are the memory policy's, in its order."""
    from infvsr_core.memory import OFFLOAD_MODES

    assert cli.OFFLOAD_MODES == OFFLOAD_MODES


def test_attention_option_selects_the_kernel(small_clip, tiny_models, tmp_path, monkeypatch, capsys):
    """--attention reaches the DiT: the plain float32 kernel gives the frames SDPA gives (fp32, a few levels at
    most); 'flash3' without FlashAttention-3 installed is one clear error line."""
    from infvsr_core import attention as attention_module

    base = ["upscale", str(small_clip), "--models", str(tiny_models), "--scale", "2", "--codec", "ffv1"]
    used: list[str] = []
    math = attention_module.ATTENTION_BACKENDS["math"]
    monkeypatch.setitem(attention_module.ATTENTION_BACKENDS, "math", lambda *a: used.append("math") or math(*a))
    outs = []
    for kernel in ("sdpa", "math"):
        out = tmp_path / f"{kernel}.mkv"
        assert cli.main([*base, "-o", str(out), "--attention", kernel, "--quiet", "--no-audio"]) == 0
        outs.append(read(out)[0])
    assert used and all(abs(a.astype(int) - b).max() <= 2 for a, b in zip(*outs, strict=True))
    monkeypatch.delitem(attention_module.ATTENTION_BACKENDS, "flash3", raising=False)
    with pytest.raises(SystemExit):  # not installed: not a choice (the registry's list, as in the loader node)
        cli.main([*base, "-o", str(tmp_path / "n.mkv"), "--attention", "flash3", "--quiet"])
    assert "invalid choice: 'flash3'" in capsys.readouterr().err
    monkeypatch.setitem(attention_module.ATTENTION_BACKENDS, "flash3", attention_module._flash3_attention)
    monkeypatch.setattr(attention_module, "_flash3", [None])
    assert cli.main([*base, "-o", str(tmp_path / "f.mkv"), "--attention", "flash3", "--quiet"]) == 1
    assert "FlashAttention-3" in capsys.readouterr().err


def test_spill_dir_gives_the_same_file(small_clip, tiny_models, tmp_path, capsys):
    """--spill-dir with --host-memory 0: every offloaded history goes through files, the frames are identical."""
    outs = []
    base = ["upscale", str(small_clip), "--models", str(tiny_models), "--scale", "2", "--codec", "ffv1"]
    for name, extra in (("none", []), ("spill", ["--offload", "state", "--spill-dir", str(tmp_path / "s")])):
        out = tmp_path / f"{name}.mkv"
        extra = [*extra, "--host-memory", "0"] if name == "spill" else extra
        assert cli.main([*base, "-o", str(out), *extra, "--quiet", "--no-audio"]) == 0
        outs.append(read(out)[0])
    assert all((a == b).all() for a, b in zip(*outs, strict=True))
    out = str(tmp_path / "x.mkv")
    assert cli.main([*base, "-o", out, "--host-memory", "1"]) == 1
    assert "--host-memory needs --spill-dir" in capsys.readouterr().err
    assert cli.main([*base, "-o", out, "--offload", "none", "--spill-dir", str(tmp_path), "--host-memory", "1"]) == 1
    assert "needs --offload" in capsys.readouterr().err


def test_seams_option_reaches_the_loader(tiny_models):
    from infvsr_core.loader import load_pipeline

    args = cli.build_parser().parse_args(["upscale", "in.mp4", "-o", "out.mp4", "--seams", "smooth"])
    assert args.seams == "smooth"
    assert cli.build_parser().parse_args(["upscale", "in.mp4", "-o", "out.mp4"]).seams == "release"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["upscale", "in.mp4", "-o", "out.mp4", "--seams", "none"])
    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32", vae_seams=args.seams)
    assert (pipe.vae.tile_stride, pipe.vae.tile_margin) == (80, 16)
    with pytest.raises(ValueError, match="seams"):
        load_pipeline(tiny_models, device="cpu", dtype="fp32", vae_seams="none")


def test_png_folder_output_with_start_and_frames(small_clip, tiny_models, tmp_path):
    out = tmp_path / "frames"
    args = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--scale", "2"]
    assert cli.main([*args, "--start", "5", "--frames", "10", "--quiet", "--no-scene-detect"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"frame_{i:06d}.png" for i in range(1, 11)]


def test_existing_output_is_refused(small_clip, tiny_models, tmp_path, capsys):
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    assert cli.main(["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == b"keep me"


def test_missing_weights_one_clear_line(small_clip, tmp_path, capsys):
    code = cli.main(["upscale", str(small_clip), "-o", str(tmp_path / "o.mp4"), "--models", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: missing weight file 'InfVSR.ckpt'") and str(tmp_path) in err[0]


def test_not_a_video(tmp_path, tiny_models, capsys):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    assert cli.main(["upscale", str(bad), "-o", str(tmp_path / "o.mp4"), "--models", str(tiny_models)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "notes.mp4" in err[0]


def test_ctrl_c_keeps_a_valid_partial_file(small_clip, tiny_models, tmp_path, monkeypatch, capsys):
    real_push, calls = SceneStream.push, []

    def push(self, frames, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first read chunk was upscaled (and, deferred, held back: collected)
            raise KeyboardInterrupt
        return real_push(self, frames, **kwargs)

    monkeypatch.setattr(SceneStream, "push", push)
    out = tmp_path / "partial.mp4"
    args = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--scale", "2"]
    assert cli.main([*args, "--no-scene-detect", "--quiet"]) == 130
    assert "interrupted: kept the 9 finished frames" in capsys.readouterr().err
    frames, _, _, _ = read(out)
    assert len(frames) == 9


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["upscale", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--models",
        "--scale",
        "--dtype",
        "--device",
        "--codec",
        "--crf",
        "--no-scene-detect",
        "--start",
        "--frames",
        "--overwrite",
        "--offload",
        "--spill-dir",
        "--host-memory",
        "--attention",
    ):
        assert flag in text


def test_variable_frame_rate_timing_is_kept(tiny_models, tmp_path):
    """A clip whose first frame lasts 3 frame periods keeps that gap in the upscaled file."""
    src = tmp_path / "vfr.mkv"
    frames = (make_clip(12, 16, 16, seed=9).numpy() * 255).round().astype(np.uint8)
    pts = [0, 3] + list(range(4, 14))  # in 1/24 s: a long first frame, then a steady 24 fps
    with av.open(str(src), "w") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "bgr0"
        stream.time_base = Fraction(1, 24)
        for frame, t in zip(frames, pts, strict=True):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = t, Fraction(1, 24)
            out.mux(stream.encode(vf))
        out.mux(stream.encode())
    dst = tmp_path / "vfr_x2.mkv"
    args = ["upscale", str(src), "-o", str(dst), "--models", str(tiny_models), "--scale", "2", "--codec", "ffv1"]
    assert cli.main([*args, "--quiet"]) == 0
    with av.open(str(dst)) as container:
        times = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    assert len(times) == 12
    assert times[1] - times[0] == pytest.approx(3 / 24, abs=2e-3)
    assert times[2] - times[1] == pytest.approx(1 / 24, abs=2e-3)


def test_disk_full_leaves_nothing_under_the_final_name(small_clip, tiny_models, tmp_path, monkeypatch, capsys):
    import errno

    from infvsr_core.io import VideoWriter

    real_write, calls = VideoWriter.write, []

    def write(self, frames, timestamps=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, frames, timestamps)

    monkeypatch.setattr(VideoWriter, "write", write)
    out = tmp_path / "full.mp4"
    args = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--scale", "2", "--quiet"]
    assert cli.main([*args, "--no-scene-detect"]) == 1  # two writes (9, then 15 frames): the second fails
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert list(tmp_path.iterdir()) == []  # no final file, no temp file


def test_the_allocator_setting_is_made_before_torch_loads_and_a_users_wins(tmp_path):
    """The command line sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for its own process only when the
    user has not set it (torch reads it at its first CUDA allocation)."""
    import subprocess
    import sys

    code = (
        "import os, sys; from infvsr_core import cli; "
        "cli.main(['upscale', 'missing.mp4', '-o', sys.argv[1]]); print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    )
    out = tmp_path / "o.mp4"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "expandable_segments:True", done.stderr
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "max_split_size_mb:128", done.stderr


def test_gpu_memory_cap_needs_a_gpu(small_clip, tiny_models, tmp_path, capsys):
    out = tmp_path / "x.mkv"
    argv = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--device", "cpu"]
    assert cli.main([*argv, "--gpu-memory", "8"]) == 1
    assert "a GPU memory cap needs a CUDA device, not cpu" in capsys.readouterr().err
    assert not out.exists()
