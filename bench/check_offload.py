"""GPU check of the host memory's pinned pool (memory/host.py, pinned.py): values through churned histories,
reuse, copy rates (device run); `--tiles`: the deferred tile uploads give the same frames."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infvsr_core.memory import HostMemory  # noqa: E402


def rate(gib: float, seconds: float) -> str:
    return f"{gib / seconds:.1f} GiB/s"


def main() -> None:
    device = torch.device("cuda")
    cl3 = torch.channels_last_3d
    # A 720p-like decoder history: 2-frame caches of 96..384 channels, ~4 GiB in all.
    shapes = [(1, 96, 2, 720, 1280)] * 8 + [(1, 192, 2, 360, 640)] * 8 + [(1, 384, 2, 180, 320)] * 10
    for pin in (True, False):
        host_memory = HostMemory(pin_memory=pin)
        values = [torch.randn(s, device=device, dtype=torch.bfloat16).contiguous(memory_format=cl3) for s in shapes]
        gib = sum(v.numel() * 2 for v in values) / 2**30
        host = host_memory.to_host(values)
        downs, ups = [], []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            back = host_memory.to_device(host, device).settle()
            torch.cuda.synchronize()
            ups.append(time.perf_counter() - t0)
            assert all(torch.equal(b, v) for b, v in zip(back, values, strict=True)), "upload mismatch"
            values = [b.add_(1) for b in back]  # the next chunk's history
            # Compute queued on the main stream while the downloads run (they must wait for it).
            a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            for _ in range(20):
                a = a @ a.T / 8192
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            host = host_memory.to_host(values)
            host.ready.synchronize()
            downs.append(time.perf_counter() - t0)
            assert all(h.is_pinned() == pin for h in host), "pinned state"
        check = host_memory.to_device(host, device).settle()
        ok = all(torch.equal(c, v) for c, v in zip(check, values, strict=True))
        print(
            f"pin={pin}: {gib:.2f} GiB history, values {'ok' if ok else 'WRONG'}; upload {rate(gib, min(ups))}, "
            f"download {rate(gib, min(downs))} (best of 4); pool used {host_memory.pool.used_bytes / 2**30:.2f} GiB, "
            f"free {host_memory.pool.free_bytes / 2**30:.2f} GiB"
        )
        del host, check, values, back
        print(f"  trimmed {host_memory.trim() / 2**30:.2f} GiB")
    fetch_check(device)


def fetch_check(device: torch.device) -> None:
    """A chunk's output frames to host memory: HostMemory.fetch (page-locked staging, then a host copy) against
    CUDA's own copy into pageable memory, each right after GPU work (as at the end of a chunk)."""
    host_memory = HostMemory()
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for label, shape in (("720p", (12, 720, 1280, 3)), ("1080p", (12, 1080, 1920, 3))):
        frames = torch.rand(shape, device=device)
        gib = frames.numel() * 4 / 2**30
        times: dict[str, list[float]] = {"fetch": [], "to(cpu)": []}
        for _ in range(4):
            for name, fn in (("fetch", host_memory.fetch), ("to(cpu)", lambda t: t.to("cpu"))):
                for _ in range(5):
                    a = a @ a.T / 8192  # queued work ahead of the copy
                torch.cuda.synchronize()
                out = None
                t0 = time.perf_counter()
                out = fn(frames)
                times[name].append(time.perf_counter() - t0)
                assert torch.equal(out, frames.cpu()) and not out.is_pinned() and out.is_contiguous(), name
                del out
        print(
            f"{label} output ({gib:.2f} GiB float32): fetch {1000 * min(times['fetch']):.1f} ms, "
            f"to(cpu) {1000 * min(times['to(cpu)']):.1f} ms (best of 4); values equal, pageable; staging kept "
            f"{host_memory.host_memory()[1] / 2**20:.0f} MiB"
        )
        host_copies(frames)
    fetch_later_check(device, a)


def fetch_later_check(device: torch.device, a: torch.Tensor) -> None:
    """HostMemory.fetch_later, as a deferred push uses it: the frames are dropped at once and their block is
    taken by the next chunk's work (written over) while the copy runs on its side stream; the copy must still
    bring the frames' own values. Then the time the compute stream spends on the copy (none: it is beside)."""
    host_memory = HostMemory()
    for shape in ((12, 720, 1280, 3), (12, 1080, 1920, 3)):
        for _ in range(3):
            frames = torch.rand(shape, device=device) * 2
            expected = frames.clone()
            pending = host_memory.fetch_later(frames)
            del frames
            junk = torch.empty(shape, device=device).fill_(-1.0)  # the freed block, if the allocator gives it
            for _ in range(3):
                junk.mul_(1.5)
            got = pending.wait()
            assert torch.equal(got, expected.cpu()) and not got.is_pinned(), shape
            del junk, got, expected
        frames = torch.rand(shape, device=device)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = host_memory.fetch_later(frames)
        for _ in range(5):
            a = a @ a.T / 8192
        end.record()
        pending.wait()
        torch.cuda.synchronize()
        print(
            f"fetch_later {shape[1]}p: values equal with the block reused at once; 5 GEMMs queued behind the copy "
            f"{start.elapsed_time(end):.1f} ms on the compute stream"
        )


def host_copies(frames: torch.Tensor) -> None:
    """Where a fetch's host time goes: the pinned staging's copy into fresh pageable memory (every page
    faulted in, as when the caller keeps each chunk) against one into memory written before, ms (median of 6)."""
    staging = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
    staging.copy_(frames)
    kept, fresh, warm, alloc = [], [], [], []
    target = torch.empty_like(staging, device="cpu").fill_(0)
    for _ in range(6):
        t0 = time.perf_counter()
        kept.append(staging.clone())
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        target.copy_(staging)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.empty_like(staging, device="cpu").fill_(0)
        alloc.append(time.perf_counter() - t0)
    med = lambda xs: 1000 * sorted(xs)[len(xs) // 2]  # noqa: E731
    print(
        f"  host copy of the staging: into fresh memory {med(fresh):.1f} ms, into memory written before "
        f"{med(warm):.1f} ms; a fresh block written once {med(alloc):.1f} ms"
    )


def tile_defer_check(size: str = "1080p", device: str = "cuda", **pipeline: object) -> None:
    """Full-size pipeline, offload "state", tiled: the next tile's decoder history prefetched without its
    full-resolution entries (queued when that tile starts) against prefetched whole. Only the copies' timing
    differs, so the frames must be bit for bit the same: a read before its upload arrived would show here."""
    from bench_pipeline import SIZES, random_pipeline, run_stream, synthetic_clip

    pipe = random_pipeline(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32, **pipeline)
    pipe.offload = "state"
    height, width = SIZES[size]
    clip = synthetic_clip(9 + 12 * 2, height, width, torch.device(device))
    outs = {}
    for defer in (True, False, True):
        pipe.vae.defer_full_res = defer
        out, _ = run_stream(pipe, clip, 4)
        if defer in outs:
            assert torch.equal(out, outs[defer]), "not deterministic run to run"
        outs[defer] = out
    same = torch.equal(outs[True], outs[False])
    diff = (outs[True].float() - outs[False].float()).abs().max().item()
    print(f"{size} state, tiled: deferred full-resolution uploads vs whole prefetch: bit-equal {same}, max diff {diff}")
    pieces = pipe.vae.fast_options
    # The upsampler on all frames at once: other conv calls, same arithmetic.
    pipe.vae.fast_options = dataclasses.replace(pieces, piece_upsampler=False)
    whole, _ = run_stream(pipe, clip, 4)
    pipe.vae.fast_options = pieces
    diff = (outs[True].float() - whole.float()).abs().max().item()
    print(f"  upsampler in pieces vs on all frames: bit-equal {torch.equal(outs[True], whole)}, max diff {diff}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--tiles"]:
        tile_defer_check()
    else:
        main()
