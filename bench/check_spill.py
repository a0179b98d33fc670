"""GPU check of the history spill (memory/spill.py): the same frames with and without it, and its cost (device run).

    python bench/check_spill.py --size 1080p --host-memory 4 --chunks 4 [--spill-dir /tmp/spill]

Streams the same clip with offload "state" twice through one full-size random
pipeline: histories all in host memory, then capped at --host-memory GiB with
the rest spilled; prints fps, host memory held, bytes spilled, and whether the
outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SIZES, random_pipeline, synthetic_clip  # noqa: E402


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1080p", choices=sorted(SIZES))
    parser.add_argument("--host-memory", type=float, default=4.0, help="GiB of host memory for the histories")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--spill-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    device = torch.device("cuda")
    pipe = random_pipeline(device, torch.bfloat16)
    pipe.offload = "state"
    height, width = SIZES[args.size]
    clip = synthetic_clip(9 + 12 * (args.chunks - 1), height, width, torch.device("cpu"))
    results = {}
    for label in ("host", "spill"):
        if label == "spill":
            pipe.vae.set_spill(args.spill_dir, args.host_memory)
        session, start, outs, times, held = pipe.new_session(4), 0, [], [], []
        while start < clip.shape[0]:
            size = session.next_chunk_length
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs.append(pipe.push(session, clip[start : start + size]).cpu())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            held.append(pipe.host_memory()[0] / 2**30)
            start += size
        outs.append(pipe.close(session).cpu())
        results[label] = torch.cat(outs)
        steady = sum(times[2:]) or float("nan")  # chunk 2 allocates the pinned blocks
        spilled = pipe.vae.spill.spilled_bytes / 2**30 if pipe.vae.spill else 0.0
        chunks = ", ".join(f"{t:.2f}" for t in times)
        print(
            f"{label}: {args.size} fps {12 * (len(times) - 2) / steady:.2f} (chunks {chunks} s), "
            f"host memory held max {max(held):.2f} GiB, spilled {spilled:.1f} GiB in all"
        )
    same = torch.equal(results["host"], results["spill"])
    print(f"identical frames: {same}")
    pipe.vae.spill.close()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
