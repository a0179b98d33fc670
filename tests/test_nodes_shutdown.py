"""ComfyUI stopped by SIGTERM while a node writes: the output is finalized as a valid file, then the process ends
as the signal says. Run in a real process with a real signal; the node's writes come from a worker thread, as in
ComfyUI (whose prompt worker is not the main thread that receives signals)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]

SERVER = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    import torch
    from nodes import shutdown
    from nodes.sink import VideoSink

    assert shutdown.install()
    sinks = [VideoSink(f"InfVSR/{name}", "h264-mp4", 24, 18, output_dir=Path(sys.argv[1])) for name in "ab"]
    sinks[1].write(torch.rand(5, 32, 48, 3))  # a stream's output, open between queue runs

    def node():
        while True:
            sinks[0].write(torch.rand(4, 32, 48, 3))
            time.sleep(0.01)

    threading.Thread(target=node, daemon=True).start()
    while sinks[0].frames_written < 40:
        time.sleep(0.01)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
    """
)


def test_sigterm_finalizes_every_open_output(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err  # the default action still ends the process
    assert "stopped by SIGTERM" in err
    folder = tmp_path / "InfVSR"
    files = sorted(p.name for p in folder.iterdir())
    assert [f for f in files if f.startswith(".")] == [], files
    counts = {}
    for name in ("a", "b"):
        (path,) = folder.glob(f"{name}_*.mp4")
        with av.open(str(path)) as container:
            counts[name] = sum(1 for _ in container.decode(video=0))
    assert counts["a"] >= 40 and counts["a"] % 4 == 0 and counts["b"] == 5
