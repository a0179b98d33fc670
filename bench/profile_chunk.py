"""Where one steady chunk's GPU time and memory go, stage by stage (prepare, encode, DiT, decode, finish, output).

    python bench/profile_chunk.py --size 720p [--offload none] [--top 25] [--whole] [--memory-gib 24]
    python bench/profile_chunk.py --size 720p --deferred 3   # where the host waits between deferred pushes

Builds the full-size pipeline from random weights in the published formats
(as bench_pipeline.py), pushes three chunks to warm up (torch.compile,
cuDNN's algorithm search, the DiT's CUDA graph capture), times each stage of
chunks 4-5 (synchronized wall time: the GPU's time plus whatever the host
adds, launch overhead included), then pushes the sixth chunk with each of its
stages (`PROFILED_STAGES`) under its own profiler, and prints per stage: the
GPU time by kernel class (convolution, GEMM, attention, Triton, copy, other
elementwise) with the top kernels, and the memory allocated at the stage's
start and its peak. The stages are the pipeline's own, seen through its
public `stage_hook` (and the VAE's `call_hook` for --tiles).
"""

from __future__ import annotations

import argparse
import bisect
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SIZES, random_pipeline, synthetic_clip  # noqa: E402

CLASSES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)", re.I)),
    ("conv", re.compile(r"conv|implicit|sm90_xmma_fprop|xmma_fprop|fprop|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas", re.I)),
    ("triton", re.compile(r"^triton|_rms_|_bias_", re.I)),
    ("copy", re.compile(r"copy|cat|Memcpy|Memset|fill", re.I)),
]


PROFILED_STAGES = ("prepare", "encode", "dit", "decode", "finish", "output")
"""The pipeline's stages (`InfVSRPipeline.stage_hook` names) profiled kernel by kernel in the last chunk."""


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def gib(n: int) -> float:
    return n / 2**30


def _copy_sources(label: str, events) -> None:
    """GPU time of copies and fills (kernels and device-to-device memcpys) by the Python line that issued them."""
    by_line: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        owner = event  # runtime calls (cudaMemcpyAsync) carry no stack: their aten op's parent does
        while owner is not None and not owner.stack:
            owner = owner.cpu_parent
        stack = owner.stack if owner is not None else []
        for kernel in event.kernels:
            if kernel_class(kernel.name) != "copy":
                continue
            frames = [f for f in stack if "infvsr_core" in f][:2] or stack[:2] or [event.name]
            entry = by_line[" < ".join(frames)]
            entry[0] += kernel.duration / 1000
            entry[1] += 1
    print(f"   {label}: copies and fills by source line (GPU ms, count):")
    for line, (ms, count) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"   {ms:8.2f} ms {count:5d}x  {line}")


@contextmanager
def profiled(label: str, top: int, copies: bool = False) -> Iterator[None]:
    """Run the body under the profiler; print its kernels by class and the stage's memory."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start_alloc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if copies else [])
    with profile(activities=activities, with_stack=copies) as prof:
        yield
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    if copies:
        _copy_sources(label, prof.events())
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels[event.name]
        entry[0] += event.device_time_total / 1000
        entry[1] += 1
    by_class: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_class[kernel_class(name)] += ms
    total = sum(by_class.values())
    print(f"\n== {label}: GPU {total:.1f} ms; memory at start {gib(start_alloc):.2f} GiB, peak {gib(peak):.2f} GiB")
    print("   " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])))
    for name, (ms, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {ms:8.2f} ms {count:5d}x  [{kernel_class(name)}] {name[:150]}")


def _busy(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """The union's length of sorted (start, end) intervals and the gaps between them as (length, at)."""
    busy, gaps, cursor = 0.0, [], None
    for a, b in intervals:
        if cursor is None or a > cursor:
            if cursor is not None:
                gaps.append((a - cursor, cursor))
            busy += b - a
            cursor = b
        elif b > cursor:
            busy += b - cursor
            cursor = b
    return busy, gaps


def whole_push(pipe, height: int, width: int, args) -> int:
    """One steady chunk through `pipeline.push` (after 5 warm chunks), under the profiler with CPU activity:
    wall time, GPU busy time (union of kernel intervals) and where the GPU waited (largest idle gaps, with
    the innermost CPU op running when each began)."""
    from torch.profiler import ProfilerActivity, profile

    clip = synthetic_clip(9 + 12 * 5, height, width, torch.device("cpu"))
    session, start = pipe.new_session(args.scale), 0
    for size in (9, 12, 12, 12, 12):
        pipe.push(session, clip[start : start + size])
        start += size
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.stacks) as prof:
        begin = time.perf_counter()
        pipe.push(session, clip[start : start + 12])
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - begin)
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    # Host-device copies run beside the kernels (copy engines); device-to-device ones are the stream's own work.
    transfer = ("Memcpy HtoD", "Memcpy DtoH")
    named = sorted((e.time_range.start, e.time_range.end, e.name) for e in gpu if not e.name.startswith(transfer))
    kernels = [(a, b) for a, b, _ in named]
    copies = sum(e.time_range.end - e.time_range.start for e in gpu if e.name.startswith(transfer))
    cpu_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    busy, gaps = _busy(kernels)
    idle = sum(g for g, _ in gaps)
    print(
        f"\n== whole push, {args.size}: wall {wall:.1f} ms, GPU busy with kernels {busy / 1000:.1f} ms (host-device "
        f"copies, not counted: {copies / 1000:.1f} ms), idle between kernels {idle / 1000:.1f} ms ({len(gaps)} gaps); "
        "before the first kernel / after the last: see wall - span"
    )
    print(f"   kernel span {(kernels[-1][1] - kernels[0][0]) / 1000:.1f} ms")
    for low, high in ((0, 20), (20, 100), (100, 500), (500, 2000), (2000, float("inf"))):
        picked = [g for g, _ in gaps if low <= g < high]
        print(f"   gaps {low}-{high} us: {len(picked)}, {sum(picked) / 1000:.1f} ms")
    # What starts after the idle time (by kernel name), over gaps of 100 us or more.
    after: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    starts = [a for a, _, _ in named]
    for gap, at in gaps:
        if gap >= 100:
            nxt = named[min(bisect.bisect_right(starts, at), len(named) - 1)][2]
            after[nxt][0] += gap
            after[nxt][1] += 1
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for a, b, name in named:
        by_kernel[name][0] += b - a
        by_kernel[name][1] += 1
    print("   kernels by GPU time:")
    for name, (total, count) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"   {total / 1000:8.2f} ms {count:5d}x  [{kernel_class(name)}] {name[:130]}")
    for name, (total, count) in sorted(after.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"   {total / 1000:7.2f} ms idle in {count:4d} gaps before {kernel_class(name)}: {name[:110]}")
    for gap, at in sorted(gaps, reverse=True)[: args.top]:
        around = [e for e in cpu_ops if e.time_range.start <= at <= e.time_range.end]
        inner = min(around, key=lambda e: e.time_range.end - e.time_range.start).name if around else "?"
        print(f"   {gap / 1000:7.2f} ms idle at +{(at - kernels[0][0]) / 1000:7.1f} ms  (CPU in {inner})")
    if args.stacks:  # the host's ops over a few mid-size gaps: which one held the launches back, and from where
        mids = [(g, a) for g, a in gaps if g >= 100]
        print("\n   gaps of 100 us or more, by time into the push (25 ms bins: count, idle ms):")
        bins: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
        for gap, at in mids:
            entry = bins[int((at - kernels[0][0]) / 25000)]
            entry[0] += 1
            entry[1] += gap / 1000
        print("   " + ", ".join(f"{25 * k}: {int(n)}/{ms:.1f}" for k, (n, ms) in sorted(bins.items())))
        late = [(g, a) for g, a in mids if a - kernels[0][0] > 50000]  # past the push's start
        for gap, at in late[:: max(1, len(late) // args.stacks)][: args.stacks]:
            print(f"\n   gap of {gap:.0f} us at +{(at - kernels[0][0]) / 1000:.1f} ms; host ops across it:")
            spanning = [e for e in cpu_ops if e.time_range.start <= at + gap and e.time_range.end >= at]
            for e in sorted(spanning, key=lambda e: e.time_range.start)[-12:]:
                stack = e.stack or []
                frames = ([f for f in stack if "infvsr_core" in f] or stack)[:3]
                print(
                    f"     {e.time_range.start - at:+9.0f} us, {e.time_range.end - e.time_range.start:8.0f} us "
                    f"{e.name[:60]}  {' < '.join(frames)}"
                )
    return 0


# CUDA runtime calls that can hold the host: waits for the GPU, page-locked and device allocations.
HOST_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaHost",
              "cudaMalloc", "cudaFree", "cudaStreamWaitEvent")  # fmt: skip


def deferred_pushes(pipe, height: int, width: int, args) -> int:
    """`args.deferred` steady deferred pushes (frames to host memory, as the command line and the nodes run),
    under the profiler: the wall time per push, the GPU's busy and idle time over them all, and where the host
    was held (the long CUDA runtime calls, by the Python line of the op around them): a host held by a wait for
    the GPU cannot queue the next chunk ahead, and the GPU then idles while it does."""
    from torch.profiler import ProfilerActivity, profile

    pipe.output_device = torch.device("cpu")
    chunks = 5 + args.deferred
    clip = synthetic_clip(9 + 12 * chunks, height, width, torch.device("cpu"))
    session, start = pipe.new_session(args.scale), 0
    for size in (9, 12, 12, 12, 12):
        pipe.push(session, clip[start : start + size], defer=True)
        start += size
    pipe.collect(session)
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        begin = time.perf_counter()
        for _ in range(args.deferred):
            pipe.push(session, clip[start : start + 12], defer=True)
            start += 12
            walls.append(1000 * (time.perf_counter() - begin))
        pipe.collect(session)
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - begin)
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in gpu if not e.name.startswith(("Memcpy HtoD", "Memcpy DtoH"))
    )
    busy, gaps = _busy(kernels)
    print(
        f"\n== {args.deferred} deferred pushes, {args.size}: wall {wall:.1f} ms (pushes returned at "
        f"{', '.join(f'{w:.0f}' for w in walls)} ms), GPU busy with kernels {busy / 1000:.1f} ms, idle between "
        f"kernels {sum(g for g, _ in gaps) / 1000:.1f} ms; the largest gaps:"
    )
    first = kernels[0][0] if kernels else 0.0
    for gap, at in sorted(gaps, reverse=True)[: args.top]:
        print(f"   {gap / 1000:7.2f} ms idle at +{(at - first) / 1000:7.1f} ms")
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    ops = [e for e in cpu if e.stack]
    held: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in cpu:
        length = e.time_range.end - e.time_range.start
        if not e.name.startswith(HOST_WAITS) or length < 500:
            continue
        around = [o for o in ops if o.time_range.start <= e.time_range.start and o.time_range.end >= e.time_range.end]
        inner = min(around, key=lambda o: o.time_range.end - o.time_range.start) if around else None
        frames = [f for f in (inner.stack if inner else []) if "infvsr_core" in f or "bench" in f][:3]
        where = f"{inner.name if inner else '?'} < {' < '.join(frames) or '?'}"
        entry = held[e.name, where]
        entry[0] += length / 1000
        entry[1] += 1
    print("   host held (runtime calls of 0.5 ms or more, by where):")
    for (name, where), (ms, count) in sorted(held.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"   {ms:8.1f} ms in {count:3d} x {name}: {where[:200]}")
    return 0


@contextmanager
def synchronized_ms(into: list[float]) -> Iterator[None]:
    """The body's synchronized wall time, in ms, appended to `into`."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    yield
    torch.cuda.synchronize()
    into.append(1000 * (time.perf_counter() - begin))


class StageTimer:
    """Synchronized wall times (ms) of the pipeline's stages (`stage`, its `stage_hook`) and, while `recording`,
    of the VAE's calls (`call`, its `call_hook`: each tile's, when tiled)."""

    def __init__(self) -> None:
        self.stages: dict[str, list[float]] = defaultdict(list)
        self.calls: dict[tuple[str, tuple[int, int]], list[float]] = defaultdict(list)
        self.recording = False

    def stage(self, label: str) -> AbstractContextManager[None]:
        return synchronized_ms(self.stages[label])

    def call(self, name: str, size: tuple[int, int]) -> AbstractContextManager[None]:
        return synchronized_ms(self.calls[name, size]) if self.recording else nullcontext()


def staged_chunks(pipe, height: int, width: int, args) -> int:
    """Six chunks pushed with a `StageTimer` as the stage hook (and the VAE's call hook, with --tiles); the
    last chunk's stages (`PROFILED_STAGES`) each under its own profiler. Prints the times of chunks 4-5."""
    clip = synthetic_clip(9 + 12 * 5, height, width, torch.device("cpu"))
    session = pipe.new_session(args.scale)
    timer = StageTimer()

    def last_chunk(label: str) -> AbstractContextManager[None]:
        return profiled(label, args.top, args.copies) if label in PROFILED_STAGES else timer.stage(label)

    if args.tiles:
        pipe.vae.call_hook = timer.call
    start = 0
    try:
        for index, size in enumerate((9, 12, 12, 12, 12, 12)):
            timer.recording = index in (3, 4)
            pipe.stage_hook = last_chunk if index == 5 else timer.stage
            pipe.push(session, clip[start : start + size])
            start += size
    finally:
        pipe.stage_hook = None
        pipe.vae.call_hook = None
    print("\nwall time per stage, synchronized, chunks 4-5 (unprofiled):")
    for label, values in timer.stages.items():
        if values[3:5]:
            print(f"   {label}: " + " / ".join(f"{v:.1f}" for v in values[3:5]) + " ms")
    if timer.calls:
        print("\nVAE calls (encode or decode, input height x width), synchronized, chunks 4-5, ms per call:")
        for (name, shape), values in sorted(timer.calls.items()):
            print(f"   {name} {shape[0]}x{shape[1]}: {len(values)} calls, mean {sum(values) / len(values):.1f}")
    scene = session.scene
    kv_bytes = sum(t.numel() * t.element_size() for t in [*scene.kv_cache.keys, *scene.kv_cache.values])
    print(f"\nstate: VAE history {gib(scene.vae_history.nbytes()):.2f} GiB, KV cache {gib(kv_bytes):.2f} GiB")
    return 0


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--offload", default="none")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--whole", action="store_true", help="profile one whole steady push() and its GPU idle gaps")
    parser.add_argument("--tiles", action="store_true", help="also time each VAE call (each tile of a tiled frame)")
    parser.add_argument("--copies", action="store_true", help="per stage: copies by the Python line issuing them")
    parser.add_argument("--stacks", type=int, default=0, help="--whole: host ops and Python stacks over N gaps")
    parser.add_argument("--deferred", type=int, default=0, help="profile N deferred pushes: where the host waits")
    parser.add_argument("--memory-gib", type=float, help="cap the process's GPU memory (as a card of this size)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"], help="fp8: the product's dtype fp8")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / total)
    pipe = random_pipeline(device, torch.bfloat16, fp8=args.dtype == "fp8")
    pipe.offload = args.offload
    height, width = SIZES[args.size]
    if args.whole:
        return whole_push(pipe, height, width, args)
    if args.deferred:
        return deferred_pushes(pipe, height, width, args)
    return staged_chunks(pipe, height, width, args)


if __name__ == "__main__":
    raise SystemExit(main())
