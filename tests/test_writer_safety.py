"""VideoWriter under concurrency and after crashes: unique temporaries, the install race, stale temporaries of killed
runs, a full disk. Real writers, real files, real processes; nothing is mocked."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infvsr_core.io import VideoError, VideoReader, VideoWriter, unfinished_outputs

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "infvsr_core.io.outputs"  # the stale temporaries are removed there


def frames_of(seed: int, count: int, height: int = 48, width: int = 64) -> torch.Tensor:
    """Random 8-bit-valued frames: the lossless formats give them back exactly, and two seeds never look alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), generator=g).float() / 255


def read_back(path: Path) -> torch.Tensor:
    with VideoReader(path) as reader:
        return reader.read_all().frames


def same_frames(path: Path, frames: torch.Tensor) -> bool:
    back = read_back(path)
    return back.shape == frames.shape and torch.equal((back * 255).round(), (frames * 255).round())


def hidden_leftovers(folder: Path, name: str) -> list[Path]:
    stem = name.split(".")[0]
    return [p for p in folder.iterdir() if p.name.startswith(f".{stem}.")]


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    """A separate interpreter running `code` from the repository root (so infvsr_core imports)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Two writers of one output
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec, name", [("ffv1", "same.mkv"), ("png", "same_frames")])
def test_two_overwriting_writers_both_close_and_the_last_to_finish_wins(tmp_path: Path, codec: str, name: str) -> None:
    """Before, both used one temporary name: the second close() found no file and the output mixed both runs."""
    out = tmp_path / name
    first, second = frames_of(1, 3), frames_of(2, 5)
    a = VideoWriter(out, 25, codec=codec, overwrite=True)
    b = VideoWriter(out, 25, codec=codec, overwrite=True)
    assert a.temp_path != b.temp_path and a.temp_path.parent == b.temp_path.parent == tmp_path
    assert a.temp_path.name.startswith(".") and b.temp_path.name.startswith(".")
    a.write(first[:2])
    b.write(second[:3])
    a.write(first[2:])
    b.write(second[3:])
    assert a.close() == out
    assert same_frames(out, first)
    assert b.close() == out
    assert same_frames(out, second)  # exactly the later run's frames, none of the earlier one's
    assert hidden_leftovers(tmp_path, name) == []


@pytest.mark.parametrize("codec, name", [("ffv1", "taken.mkv"), ("png", "taken_frames")])
@pytest.mark.parametrize("theirs", ["file", "empty folder"])
def test_output_created_meanwhile_is_never_replaced(tmp_path: Path, codec: str, name: str, theirs: str) -> None:
    """Without overwrite the start check is not enough: another run may create the output while we write."""
    out = tmp_path / name
    ours = frames_of(3, 4)
    writer = VideoWriter(out, 25, codec=codec)
    writer.write(ours)
    if theirs == "file":
        out.write_bytes(b"another run's result")
    else:
        out.mkdir()
    with pytest.raises(VideoError, match=re.escape(f"output {out} was created by another run")) as raised:
        writer.close()
    if theirs == "file":
        assert out.read_bytes() == b"another run's result"
    else:
        assert out.is_dir() and list(out.iterdir()) == []
    message = str(raised.value)
    kept = Path(re.search(r"kept in (.+)$", message)[1])
    assert kept.parent == tmp_path and not kept.name.startswith(".") and "conflict" in kept.name
    assert same_frames(kept, ours)
    assert hidden_leftovers(tmp_path, name) == []
    with pytest.raises(VideoError, match=re.escape(str(kept))):
        writer.close()  # asked again: the same answer, not "nothing was saved"
    writer.abort()
    assert writer.finalize_partial() is None and kept.exists()  # the user's frames are never thrown away


def test_existing_output_message_speaks_to_python_and_command_line_users(tmp_path: Path) -> None:
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep")
    with pytest.raises(VideoError, match=re.escape(f"output {out} already exists")) as raised:
        VideoWriter(out, 25)
    assert "--overwrite" in str(raised.value) and "overwrite=True" in str(raised.value)
    assert out.read_bytes() == b"keep"


CHILD_WRITER = """
import sys, time
from pathlib import Path
import torch
from infvsr_core.io import VideoError, VideoWriter

out, seed, count, overwrite, ready, go = sys.argv[1:]
writer = VideoWriter(out, 25, codec="ffv1", overwrite=overwrite == "1")
Path(ready).touch()
while not Path(go).exists():  # both writers exist before either writes: a real overlap
    time.sleep(0.01)
g = torch.Generator().manual_seed(int(seed))
frames = torch.randint(0, 256, (int(count), 48, 64, 3), generator=g).float() / 255
for i in range(len(frames)):
    writer.write(frames[i : i + 1])
try:
    writer.close()
except VideoError as e:
    print(e)
    sys.exit(3)
print("installed")
"""


@pytest.mark.parametrize("overwrite", [True, False])
def test_two_processes_writing_one_output(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "shared.mkv"
    go = tmp_path / "go"
    runs = {7: 6, 8: 9}  # seed -> frame count: each run is recognisable by both
    children = {
        seed: run_python(
            CHILD_WRITER, str(out), str(seed), str(n), str(int(overwrite)), str(tmp_path / f"r{seed}"), str(go)
        )
        for seed, n in runs.items()
    }
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"r{seed}").exists() for seed in runs):
            assert all(c.poll() is None for c in children.values()), [c.communicate() for c in children.values()]
            assert time.monotonic() < deadline, "the writer processes did not start"
            time.sleep(0.05)
        go.touch()
        results = {seed: (c.wait(timeout=240), c.communicate()) for seed, c in children.items()}
    finally:
        for c in children.values():
            if c.poll() is None:
                c.kill()
                c.wait()
    assert all(rc in (0, 3) for rc, _ in results.values()), results
    installed = [seed for seed, (rc, _) in results.items() if rc == 0]
    if overwrite:
        assert len(installed) == 2, results  # each close succeeds; the file is the last one's
        assert any(same_frames(out, frames_of(seed, n)) for seed, n in runs.items())
        assert [p.name for p in tmp_path.iterdir() if "conflict" in p.name] == []
    else:
        assert len(installed) == 1, results  # the name goes to exactly one run
        winner = installed[0]
        loser = next(seed for seed in runs if seed != winner)
        assert same_frames(out, frames_of(winner, runs[winner]))
        message = results[loser][1][0].strip()
        assert f"output {out} was created by another run" in message
        kept = Path(re.search(r"kept in (.+)$", message)[1])
        assert same_frames(kept, frames_of(loser, runs[loser]))
    assert hidden_leftovers(tmp_path, out.name) == []


def test_sink_names_skip_an_output_another_writer_is_still_filling(tmp_path: Path) -> None:
    """The counter scan reads only finished names and the old fixed temporary name; a second save with the same
    prefix must not pick the name an open writer will install."""
    from nodes.sink import free_output_path

    first, _, name = free_output_path(tmp_path, "clip", "mp4")
    assert name == "clip_00001.mp4"
    writer = VideoWriter(first, 25)
    writer.write(frames_of(4, 2))
    assert unfinished_outputs(first) == [writer.temp_path]
    second, _, name = free_output_path(tmp_path, "clip", "mp4")
    assert name == "clip_00002.mp4" and second == tmp_path / name
    writer.close()
    assert unfinished_outputs(first) == []
    assert free_output_path(tmp_path, "clip", "mp4")[2] == "clip_00002.mp4"

    folder, _, name = free_output_path(tmp_path, "seq", "")
    png = VideoWriter(folder, 25, codec="png")
    png.write(frames_of(5, 1))
    assert free_output_path(tmp_path, "seq", "")[2] == "seq_00002"
    png.abort()


def test_the_node_output_folder_does_not_collect_killed_runs_temporaries(tmp_path: Path) -> None:
    """A save with a prefix whose next name has a killed run's temporary takes that name and removes the
    temporary; a live run's temporary still moves the counter on."""
    from nodes.sink import free_output_path

    probe_writer = VideoWriter(tmp_path / "probe.mp4", 25)
    host = probe_writer.temp_path.name.split(".")[2].split("-")[1]
    probe_writer.abort()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".clip_00001.{int(ended.stdout)}-{host}-0badc0de.partial.mp4"
    dead.write_bytes(b"half a video")
    path, _, name = free_output_path(tmp_path, "clip", "mp4")
    assert name == "clip_00001.mp4" and not dead.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".clip_00001.{sleeper.pid}-{host}-00c0ffee.partial.mp4"
        live.write_bytes(b"being written")
        assert free_output_path(tmp_path, "clip", "mp4")[2] == "clip_00002.mp4" and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------------------------
# What killed runs leave behind
# ---------------------------------------------------------------------------------------------------------------


def test_stale_temporaries_of_killed_runs_are_removed_and_live_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.mp4"
    probe_writer = VideoWriter(out, 25)
    token = re.fullmatch(
        rf"\.out\.{os.getpid()}-([0-9a-f]{{6}})-[0-9a-f]{{8}}\.partial\.mp4", probe_writer.temp_path.name
    )
    assert token is not None, probe_writer.temp_path.name
    host = token[1]
    probe_writer.abort()

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)  # waited for: this process id names no running process now
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other_host = f"{(int(host, 16) + 1) % 0x1000000:06x}"
        legacy = tmp_path / ".out.partial.mp4"
        dead = tmp_path / f".out.{dead_pid}-{host}-0badc0de.partial.mp4"
        dead_folder = tmp_path / f".out.mp4.{dead_pid}-{host}-0badf00d.partial"  # a PNG run aimed at the same name
        live = tmp_path / f".out.{sleeper.pid}-{host}-00c0ffee.partial.mp4"
        foreign = tmp_path / f".out.{dead_pid}-{other_host}-0000beef.partial.mp4"  # its pid means nothing here
        other_output = tmp_path / f".other.{dead_pid}-{host}-0badbeef.partial.mp4"
        fresh_legacy = tmp_path / ".fresh.partial.mp4"
        for path in (legacy, dead, live, foreign, other_output, fresh_legacy):
            path.write_bytes(b"half a video")
        dead_folder.mkdir()
        (dead_folder / "frame_000001.png").write_bytes(b"half a frame")
        old = time.time() - 3600
        os.utime(legacy, (old, old))
        os.utime(foreign, (old, old))

        with caplog.at_level(logging.WARNING, logger=LOGGER):
            writer = VideoWriter(out, 25)
        removed = [r.getMessage() for r in caplog.records if r.name == LOGGER and "removing" in r.getMessage()]
        assert not legacy.exists() and not dead.exists() and not dead_folder.exists()
        assert live.exists() and foreign.exists() and other_output.exists()
        assert sorted(removed) == sorted(
            f"removing {p}, an unfinished temporary output for {out}: {why}"
            for p, why in [
                (legacy, "an earlier version's temporary name, no longer being written"),
                (dead, f"the run that wrote it (process {dead_pid}) has ended"),
                (dead_folder, f"the run that wrote it (process {dead_pid}) has ended"),
            ]
        )
        writer.write(frames_of(6, 2))
        assert writer.close() == out and live.exists()

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            VideoWriter(tmp_path / "fresh.mp4", 25).abort()
        assert fresh_legacy.exists() and not caplog.records  # recently written: an older version may be writing it
    finally:
        sleeper.kill()
        sleeper.wait()
    VideoWriter(out, 25, overwrite=True).abort()
    assert not live.exists()  # its process has ended now
    assert foreign.exists()


# ---------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------

CHILD_FULL_DISK = """
import resource, signal, sys
import torch
from infvsr_core.io import BackgroundWriter, VideoError, VideoWriter

mode, out, limit, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
frames = torch.randint(0, 256, (count, 256, 256, 3), generator=g).float() / 255  # noise: nothing compresses it
# A real limit on file size: past it write() fails with EFBIG, as on a full disk (ignoring SIGXFSZ, which would
# otherwise kill the process). Set after the imports, which may write caches.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
codec = {"ffv1": "ffv1", "background": "ffv1", "png": "png", "h264": "h264"}[mode]
writer = VideoWriter(out, 25, codec=codec)
if mode == "background":
    writer = BackgroundWriter(writer)
try:
    for i in range(len(frames)):
        writer.write(frames[i : i + 1])
    writer.close()
except VideoError as e:
    print(e)
    sys.exit(3)
print("no error")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
@pytest.mark.parametrize(
    "mode, name, count, doing",
    [
        # Matroska holds a whole cluster in memory: enough frames to pass one make the limit hit inside write().
        ("ffv1", "full.mkv", 40, "writing frame"),
        ("background", "full_bg.mkv", 40, "writing frame"),
        ("png", "full_frames", 3, "writing frame 1"),
        ("h264", "full.mp4", 12, "finishing the file after 12 frames"),  # x264 holds its packets until the flush
        ("ffv1", "full_at_close.mkv", 12, "finishing the file after 12 frames"),
    ],
)
def test_full_disk_names_the_output_and_leaves_nothing(
    tmp_path: Path, mode: str, name: str, count: int, doing: str
) -> None:
    out = tmp_path / name
    child = run_python(CHILD_FULL_DISK, mode, str(out), "100000", str(count))
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 3, (stdout, stderr)
    message = stdout.strip()
    assert str(out) in message and "size limit" in message and doing in message, message
    assert f"the partial {'folder' if mode == 'png' else 'file'} was removed" in message
    assert ".partial" not in message  # the user's name for the output, not the hidden temporary's
    assert not out.exists() and hidden_leftovers(tmp_path, name) == []
