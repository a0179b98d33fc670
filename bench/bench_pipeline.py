"""Speed and memory of the full-size InfVSR pipeline on a GPU (random weights, published formats).

    python bench/bench_pipeline.py --sizes 480p 720p 1080p --chunks 8 [--dtype bf16] [--models DIR]

Speed and memory do not depend on the weights' values, so by default the
four networks are built from random state dicts in the published formats
(the same builders the loader uses) instead of reading several GB from disk.
For each size it streams `--chunks` chunks of a synthetic clip through a
session (frames in and out on the GPU) and prints: fps with the first chunk
excluded and included, per-stage time of one steady chunk (VAE encode, DiT,
VAE decode), peak allocated and reserved memory, and optionally (--parity)
the PSNR of the run against the plain float32 path on the same input.
Results go to bench/RESULTS.md by hand, with device, date, command and commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infvsr_core.attention import ATTENTION_BACKENDS, flash3_installed  # noqa: E402
from infvsr_core.dit import CausalWanDiT, DiTConfig, random_dit_state_dict  # noqa: E402
from infvsr_core.fp8 import cast_except_fp8, quantize_dit, set_float8_attention  # noqa: E402
from infvsr_core.guidance import SwinConfig, build_guidance, random_dape_state_dict, random_ram_state_dict  # noqa: E402
from infvsr_core.kernels import split_conv  # noqa: E402
from infvsr_core.kernels.row_quantize import ROW_QUANTIZE_OPS  # noqa: E402
from infvsr_core.loader import load_pipeline, parse_dtype  # noqa: E402
from infvsr_core.memory import OffloadPolicy  # noqa: E402
from infvsr_core.pipeline import InfVSRPipeline  # noqa: E402
from infvsr_core.vae import (  # noqa: E402
    FP8_OPTIONS,
    TINY_VAE_BASE_DIM,
    StreamingVAE,
    build_vae,
    random_vae_state_dict,
)
from infvsr_core.weights import load_checked  # noqa: E402

SIZES = {
    "tiny": (12, 20),
    "480p": (120, 208),
    "720p": (180, 320),
    "1080p": (270, 480),
    "1440p": (360, 640),
    "2160p": (540, 960),
}


def random_pipeline(
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    tiny: bool = False,
    fast: bool | None = None,
    fp8: bool = False,
    **vae_kwargs,
) -> InfVSRPipeline:
    """Full-size (or tiny) networks from random published-format state dicts, built like the loader does.

    `fast` selects the optimized VAE forward and fused DiT ops (None: automatic, i.e. on CUDA;
    False: the plain path, which is the parity reference).
    """
    config = DiTConfig.tiny() if tiny else DiTConfig.full()
    with torch.device("meta"):
        dit = CausalWanDiT(config)
    dit = dit.to_empty(device="cpu")
    load_checked(dit, random_dit_state_dict(config, seed=seed), what="random DiT")
    vae = build_vae(random_vae_state_dict(TINY_VAE_BASE_DIM if tiny else 96, seed=seed + 1), dtype=dtype)
    swin = SwinConfig.tiny() if tiny else SwinConfig.full()
    ram = random_ram_state_dict(swin, seed=seed + 2)
    guidance = build_guidance(ram, random_dape_state_dict(swin, seed=seed + 3), dtype=dtype)
    dit.fuse_elementwise = fast
    dit.cuda_graphs = False if fast is False else None
    streaming_vae = StreamingVAE(vae.to(device), fast=fast, **vae_kwargs)
    if fp8:  # as the loader does: quantized from the full-precision weights, the VAE's float8 convs on
        dit = cast_except_fp8(quantize_dit(dit), device, dtype)
        streaming_vae.fast_options = FP8_OPTIONS
    return InfVSRPipeline(
        dit.to(device=device, dtype=dtype) if not fp8 else dit,
        streaming_vae,
        guidance.to(device),
        device=device,
        dtype=dtype,
        output_device=device,
        model_id=f"random-{seed}",
    )


PROGRESS = False


def commit_id() -> str:
    """The commit the figures belong to: $INFVSR_COMMIT where the run's copy has no (or an old) git history, as
    on the device machine; else this checkout's HEAD; "" if neither."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)  # fmt: skip
    return os.environ.get("INFVSR_COMMIT") or head.stdout.strip()


def _widths(text: str) -> frozenset[int]:
    """'96,192,384' -> those conv output widths; 'off' -> none."""
    return frozenset() if text == "off" else frozenset(int(part) for part in text.split(","))


def synthetic_clip(frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """A moving smooth pattern plus noise, (T, H, W, 3) in [0, 1], on the device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None]
    x = torch.arange(width, dtype=torch.float32)[None, None, :]
    shape = (frames, height, width)
    channels = [torch.sin((x + 1.5 * t) / 7), torch.cos((y - 0.8 * t) / 9), torch.sin((x + y + 2 * t) / 11)]
    clip = torch.stack([c.expand(shape) for c in channels], -1) * 0.4 + 0.5
    clip = clip + 0.05 * torch.randn(*shape, 3, generator=g)
    return clip.clamp(0, 1).to(device)


def print_retry_sites(snapshot: dict, frames: int = 6) -> None:
    """The allocations after which the allocator gave memory back to the driver (it frees its cache only when a
    request does not fit, after synchronizing every stream): their size and the project's Python frames."""
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    released = False
    for entry in trace:
        if entry["action"] in ("segment_unmap", "segment_free"):
            released = True
        elif released and entry["action"] in ("alloc", "segment_alloc", "segment_map"):
            released = False
            ours = [f for f in entry.get("frames", []) if "infvsr_core" in f["filename"] or "bench" in f["filename"]]
            where = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:frames])
            print(f"  cache freed for a {entry['size'] / 2**20:.0f} MiB {entry['action']}: {where}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# The fast forward's on/off switches an A/B may flip, each as --<field> on|off (FastForwardOptions fields).
OPTION_SWITCHES = {
    "fp8_norm_store": "fp8: the VAE's norm stores the float8 convs' inputs itself",
    "fp8_row_taps": "fp8: the 96-channel float8 convs read each row of taps as one run of channels inside the frame",
    "fp8_history": "fp8: the float8-staged convs' cache entries in float8",
    "rgb_out_taps": "the VAE's RGB head as one product of its taps and one gather",
}


def _row_quantize_ops(text: str) -> tuple[str, ...]:
    """--row-quantize: 'all', 'off', or op names joined by commas."""
    names = {"all": tuple(ROW_QUANTIZE_OPS), "off": ()}.get(text, tuple(filter(None, text.split(","))))
    if unknown := set(names) - set(ROW_QUANTIZE_OPS):
        raise argparse.ArgumentTypeError(f"unknown ops {sorted(unknown)}: not among {list(ROW_QUANTIZE_OPS)}")
    return names


def run_stream(
    pipe: InfVSRPipeline,
    clip: torch.Tensor,
    scale: int,
    peaks: list[float] | None = None,
    keep: bool = True,
    keep_device: torch.device | None = None,
    hosts: list[float] | None = None,
    push_all: bool = False,
    defer: bool = False,
) -> tuple[torch.Tensor | None, list[float]]:
    """Push the clip chunk by chunk through one session; per-chunk wall times (synchronized). With
    `push_all`, the first chunk alone, then every other frame in one push (as the nodes and `upscale` do:
    one chunk's end may overlap the next one's uploads); the times are then those two calls'.

    `peaks` (when given) receives the peak allocated GiB after each chunk, `hosts` the host memory
    of the offloaded state plus the pinned blocks kept for reuse (GiB); with `keep` False the
    outputs are dropped as they come (long memory-flatness runs).
    """
    if defer:
        return run_deferred(pipe, clip, scale, peaks, keep, keep_device, hosts)
    session = pipe.new_session(scale)
    outputs, times, start = [], [], 0
    while start < clip.shape[0]:
        size = session.next_chunk_length if not (push_all and start) else clip.shape[0] - start
        sync(pipe.device)
        t0 = time.perf_counter()
        out = pipe.push(session, clip[start : start + size])
        if hosts is not None:
            hosts.append(sum(pipe.host_memory()) / 2**30)  # held + kept for reuse
        if start + size >= clip.shape[0]:
            out = torch.cat([out, pipe.close(session)])
        sync(pipe.device)
        times.append(time.perf_counter() - t0)
        if peaks is not None and pipe.device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        if PROGRESS:
            print(f"  chunk {len(times)}: {times[-1]:.2f} s", flush=True)
        if keep:
            outputs.append(out if keep_device is None else out.to(keep_device))
        del out
        start += size
    return (torch.cat(outputs) if keep else None), times


def run_deferred(
    pipe: InfVSRPipeline,
    clip: torch.Tensor,
    scale: int,
    peaks: list[float] | None,
    keep: bool,
    keep_device: torch.device | None,
    hosts: list[float] | None,
) -> tuple[torch.Tensor | None, list[float]]:
    """`run_stream` with deferred pushes (the command line's and the nodes' way): no synchronization between
    chunks; a push returns when the previous chunk's frames are in host memory. Times, one per chunk as in
    `run_stream`: the steady period for every chunk but the first, whose time is the rest of the wall time
    (so their sum is the run's wall time)."""
    session = pipe.new_session(scale)
    sizes = [9] + [12] * (-(-(clip.shape[0] - 9) // 12))
    n = len(sizes)
    if n < 5:
        raise SystemExit("deferred runs are timed between the returns of pushes 2 and n-1: use --chunks 5 or more")
    outputs, marks, start = [], [], 0
    sync(pipe.device)
    t0 = time.perf_counter()
    for index, size in enumerate(sizes + [None]):
        out = pipe.push(session, clip[start : start + size], defer=True) if size else pipe.close(session)
        if size is None:
            sync(pipe.device)
        marks.append(time.perf_counter())
        if peaks is not None and pipe.device.type == "cuda" and index:
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        if hosts is not None:
            hosts.append(sum(pipe.host_memory()) / 2**30)
        if keep and out.shape[0]:
            outputs.append(out if keep_device is None else out.to(keep_device))
        del out
        start += size or 0
    # A push returns the previous chunk once this one is queued, but a host held inside the queueing (a wait
    # for the GPU) returns it late, by how far the GPU got into this chunk meanwhile: the first pushes are not
    # steady yet and `close` returns early (nothing to queue). The steady period is taken between the returns
    # of pushes 2 and n-1 (chunks 2 .. n-2 came back between them); the first chunk's time is the rest.
    period = (marks[n - 1] - marks[2]) / (n - 3)
    times = [marks[n] - t0 - (n - 1) * period] + [period] * (n - 1)
    if PROGRESS:
        print("  returns at: " + " ".join(f"{m - t0:.3f}" for m in marks), flush=True)
    return (torch.cat(outputs) if keep else None), times


class StageRecorder:
    """A pipeline `stage_hook`: each stage of a chunk synchronized on entry and exit, its seconds and peak
    allocated GiB recorded (summed / maxed over the chunks it sees) by stage name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)


@contextmanager
def stage_hook(pipe: InfVSRPipeline, hook) -> Iterator[None]:
    """`hook` as the pipeline's stage hook for the duration."""
    pipe.stage_hook = hook
    try:
        yield
    finally:
        pipe.stage_hook = None


def stage_times(pipe: InfVSRPipeline, clip: torch.Tensor, scale: int) -> dict[str, float]:
    """Seconds per stage (and peak GiB, `<stage>_peak_gib`) for the second (steady, 12-frame) chunk of a scene,
    pushed through the pipeline with a `StageRecorder` as its stage hook (the pipeline's stage names)."""
    session = pipe.new_session(scale)
    pipe.push(session, clip[:9])
    recorder = StageRecorder(pipe.device)
    with stage_hook(pipe, recorder):
        pipe.push(session, clip[9:21])
    events = dict(recorder.seconds)
    events.update({f"{name}_peak_gib": peak for name, peak in recorder.peaks.items()})
    return events


def seam_check(pipe: InfVSRPipeline, clip: torch.Tensor, scale: int, settings: list[str]) -> list[dict]:
    """The clip tiled and untiled through the same pipeline: PSNR and where they differ, per tile setting.

    `settings` are "stride:margin" in latent pixels (110:0 is the release's tiling). `overlap_mae` is
    the mean |tiled - untiled| over the pixels of the tile overlaps (where tiles are blended),
    `interior_mae` over the rest; invisible seams mean no excess error on the overlaps. `max_8bit` and
    `p999_8bit` are the largest and 99.9th-percentile differences in 8-bit code values.
    """
    from infvsr_core.vae import SPATIAL_FACTOR, tile_regions

    saved = pipe.vae.tiling, pipe.vae.tile_stride, pipe.vae.tile_margin

    def run(tiling: str, stride: int, margin: int) -> tuple[torch.Tensor, float, float]:
        pipe.vae.tiling, pipe.vae.tile_stride, pipe.vae.tile_margin = tiling, stride, margin
        torch.cuda.reset_peak_memory_stats() if pipe.device.type == "cuda" else None
        t0 = time.perf_counter()
        out, _ = run_stream(pipe, clip, scale, keep_device=torch.device("cpu"))
        peak = torch.cuda.max_memory_allocated() / 2**30 if pipe.device.type == "cuda" else float("nan")
        return out, time.perf_counter() - t0, peak

    rows = []
    try:
        untiled, untiled_s, untiled_peak = run("never", saved[1], 0)
        for setting in settings:
            stride, margin = (int(v) for v in setting.split(":"))
            tiled, tiled_s, tiled_peak = run("always", stride, margin)
            height, width = tiled.shape[1:3]
            lat_h, lat_w = -(-height // 16) * 16 // SPATIAL_FACTOR, -(-width // 16) * 16 // SPATIAL_FACTOR
            regions = tile_regions(lat_h, lat_w, pipe.vae.tile_size, stride)
            cover = torch.zeros(lat_h * SPATIAL_FACTOR, lat_w * SPATIAL_FACTOR)
            for top, bottom, left, right in regions:
                cover[
                    top * SPATIAL_FACTOR : bottom * SPATIAL_FACTOR, left * SPATIAL_FACTOR : right * SPATIAL_FACTOR
                ] += 1
            overlap = (cover > 1)[:height, :width]
            diff = (tiled.double() - untiled.double()).abs()
            err = diff.mean(dim=(0, 3))
            sample = diff.flatten()[:: max(1, diff.numel() // 2_000_000)]
            rows.append(
                {
                    "stride_margin": setting,
                    "tiles": len(regions),
                    "psnr_tiled_vs_untiled_db": round(psnr(tiled, untiled), 2),
                    "overlap_mae": round(float(err[overlap].mean()), 6),
                    "interior_mae": round(float(err[~overlap].mean()), 6),
                    "overlap_fraction": round(float(overlap.float().mean()), 3),
                    "max_8bit": round(float(diff.max()) * 255, 2),
                    "p999_8bit": round(float(sample.quantile(0.999)) * 255, 2),
                    "seconds_tiled_untiled": [round(tiled_s, 2), round(untiled_s, 2)],
                    "peak_tiled_untiled_gib": [round(tiled_peak, 2), round(untiled_peak, 2)],
                }
            )
            del tiled
    finally:
        pipe.vae.tiling, pipe.vae.tile_stride, pipe.vae.tile_margin = saved
    return rows


# The caching allocator's events over a timed run: under a memory cap, retries (free the cache, try again) and
# device-wide synchronizations are what a cap costs.
ALLOCATOR_COUNTS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free", "num_ooms")


def allocator_counts(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR over [0, 1] frames (equal to the SPEC's [-1, 1] PSNR: both ranges scale together)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p", "1080p"], choices=sorted(SIZES))
    parser.add_argument("--chunks", type=int, default=8, help="chunks per run (first chunk 9 frames, then 12)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a CPU smoke run of this script)")
    parser.add_argument("--models", type=Path, help="load the four files from here instead of random weights")
    parser.add_argument("--parity", action="store_true", help="also compare against a float32 run (first 3 chunks)")
    parser.add_argument("--memory-fraction", type=float, help="torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--memory-gib", type=float, help="the same as a budget in GiB of the device's total")
    parser.add_argument(
        "--offload",
        nargs="+",
        default=["none"],
        choices=["auto", "none", "histories", "state", "all"],
        help="one run each (auto: the memory plan chooses under the cap, and steps down if it must)",
    )
    parser.add_argument("--pageable", action="store_true", help="offloaded state in pageable (not pinned) memory")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timing run")
    parser.add_argument("--progress", action="store_true", help="print every chunk's time")
    parser.add_argument("--outputs-on-cpu", action="store_true", help="keep the timed runs' outputs in host memory")
    parser.add_argument(
        "--seams",
        nargs="*",
        default=[],
        help="sizes to also run tiled ('always') and untiled, same precision: PSNR and error on tile overlaps",
    )
    parser.add_argument("--json", type=Path, help="append one JSON line per size here")
    parser.add_argument(
        "--tiling",
        default="auto",
        choices=["auto", "always", "never"],
        help="VAE tiling of the timed runs "
        "(the float32 reference always uses 'auto', the release's rule: its PSNR then shows the seams)",
    )
    parser.add_argument("--plain", action="store_true", help="the plain path (diffusers VAE modules, eager DiT ops)")
    parser.add_argument("--profile", nargs="*", default=[], help="sizes to profile one steady chunk of (top kernels)")
    parser.add_argument(
        "--full-res-frames", type=int, help="frames per piece of the VAE's full-res stages (0: whole calls)"
    )
    parser.add_argument(
        "--graphs", choices=["auto", "on", "off"], default="auto", help="the DiT's CUDA graphs (dit.cuda_graphs)"
    )
    parser.add_argument(
        "--vae-calls",
        choices=["auto", "whole", "split"],
        default="auto",
        help="VAE calls per chunk: whole chunks, or diffusers' 4 frames / 1 latent frame (StreamingVAE.whole_chunks)",
    )
    parser.add_argument(
        "--push-all",
        action="store_true",
        help="time the steady chunks as one push (outputs to host memory chunk by chunk, as in the nodes)",
    )
    parser.add_argument(
        "--ab-tiles",
        choices=("defer", "no-defer", "whole-upsampler"),
        help="A/B: the next tile's decoder history prefetched whole ('no-defer'), or the upsampler before the "
        "full-resolution pieces run on all frames ('whole-upsampler')",
    )
    parser.add_argument("--host-outputs", action="store_true", help="the pipeline returns frames in host memory")
    parser.add_argument(
        "--defer",
        choices=("off", "on", "ab", "abc"),
        default="off",
        help="on: deferred pushes (frames to host memory), no synchronization between chunks (the command line's and "
        "the nodes' way); ab: host outputs without, then with, twice in one process; abc: frames left on the device "
        "(timed without their copy to host memory), then the two host variants, twice (the first run's row has the "
        "stages, parity, ...)",
    )
    parser.add_argument("--plain-output-copy", action="store_true", help="A/B: frames.to('cpu') for the outputs")
    parser.add_argument("--warmup", action="store_true", help="stream 4 untimed chunks first (then 'fps all' is warm)")
    parser.add_argument(
        "--seam-settings", nargs="+", default=["110:0"], help="tile stride:margin settings for --seams (latent px)"
    )
    parser.add_argument("--vae-seams", choices=["release", "smooth"], default="release", help="tile blend setting")
    parser.add_argument("--flat-frames", type=int, default=0, help="also stream this many frames, check peak memory")
    parser.add_argument(
        "--retry-sites",
        action="store_true",
        help="print where the timed run's allocations made the allocator free its cache (and wait for every stream)",
    )
    parser.add_argument(
        "--memory-snapshot", type=Path, help="record the allocator's events over the timed run, dump them here"
    )
    parser.add_argument(
        "--cap-after-warmup",
        action="store_true",
        help="apply --memory-gib only after --warmup (cuDNN's algorithm search then ran uncapped)",
    )
    parser.add_argument(
        "--attention", default="auto", choices=sorted(ATTENTION_BACKENDS), help="the DiT's attention backend"
    )
    parser.add_argument(
        "--mid-attention", default="kernel", choices=["kernel", "blocked"], help="the VAE mid block's attention path"
    )
    parser.add_argument(
        "--split-conv", default="on", choices=["on", "off"], help="the 192-channel convs through the Triton kernel"
    )
    for field, what in OPTION_SWITCHES.items():
        parser.add_argument(
            "--" + field.replace("_", "-"),
            choices=["on", "off"],
            help=f"{what} (FastForwardOptions.{field}); default: the product's (FP8_OPTIONS in fp8)",
        )
    parser.add_argument(
        "--fp8-attention",
        choices=["on", "off"],
        help="fp8: the DiT's self-attention in float8 where FlashAttention-3 runs it (fp8.set_float8_attention); "
        "default: the product's (fp8.FLOAT8_ATTENTION)",
    )
    parser.add_argument(
        "--row-quantize",
        type=_row_quantize_ops,
        help="fp8: the DiT's quantizations by the one-read row kernel (kernels/row_quantize.py, "
        f"CausalWanDiT.row_quantize_kernels): 'all', 'off', or some of {','.join(ROW_QUANTIZE_OPS)}; "
        "default: the product's",
    )
    parser.add_argument(
        "--fp8-convs",
        type=_widths,
        help="the VAE's causal convs of these output widths in float8 (kernels/fp8_conv.py), e.g. 96,192,384, or "
        "'off'; default: the product's (the float8 convs of FP8_CONV_OUTPUTS with --dtype fp8, none otherwise)",
    )
    args = parser.parse_args()
    if args.defer != "off" and args.chunks < 5:
        parser.error("--defer needs --chunks 5 or more (deferred runs are timed between pushes 2 and n-1)")
    global PROGRESS
    PROGRESS = args.progress

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype, device)
    fp8 = args.dtype == "fp8"
    if args.memory_gib and device.type == "cuda":
        args.memory_fraction = args.memory_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory
    if args.memory_fraction and device.type == "cuda" and not args.cap_after_warmup:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    torch.backends.cuda.matmul.allow_tf32 = False
    commit = commit_id()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, dtype {dtype}, commit {commit or '?'}")
    print(f"attention {args.attention} (FlashAttention-3 installed: {flash3_installed() or 'no'})")

    if args.models:
        pipe = load_pipeline(args.models, device=device, dtype=args.dtype if fp8 else dtype, output_device=device)
    else:
        fast = False if args.plain else None
        pipe = random_pipeline(device, dtype, tiny=args.tiny, fast=fast, fp8=fp8, tiling=args.tiling)
    if args.push_all or args.host_outputs:
        # In host memory, as the nodes and the command line get them (a multi-chunk push's outputs would also
        # pile up on the device): the timed chunks include their download.
        pipe.output_device = torch.device("cpu")
    if args.plain_output_copy:  # A/B: CUDA's own copy into pageable host memory
        pipe.output_staging = False
    if args.plain:
        pipe.dit.fuse_elementwise = False
        pipe.dit.cuda_graphs = False
        pipe.vae.fast = False
    if not args.plain:
        pipe.dit.cuda_graphs = {"auto": None, "on": True, "off": False}[args.graphs]
    pipe.vae.whole_chunks = {"auto": "auto", "whole": True, "split": False}[args.vae_calls]
    pipe.dit.attention_backend = args.attention

    pipe.vae.set_seams(args.vae_seams)
    if args.ab_tiles == "no-defer":
        pipe.vae.defer_full_res = False
    elif args.ab_tiles == "whole-upsampler":
        pipe.vae.defer_full_res = False
        pipe.vae.fast_options = dataclasses.replace(pipe.vae.fast_options, piece_upsampler=False)
    pipe.vae.fast_options = dataclasses.replace(
        pipe.vae.fast_options, mid_attention_kernel=args.mid_attention == "kernel", split_conv=args.split_conv == "on"
    )
    if args.fp8_attention is not None:
        set_float8_attention(pipe.dit, args.fp8_attention == "on")
    if args.row_quantize is not None:
        pipe.dit.row_quantize_kernels = args.row_quantize
    switches = {field: getattr(args, field) == "on" for field in OPTION_SWITCHES if getattr(args, field) is not None}
    pipe.vae.fast_options = dataclasses.replace(pipe.vae.fast_options, **switches)
    if args.fp8_convs is not None:
        pipe.vae.fast_options = dataclasses.replace(pipe.vae.fast_options, fp8_conv_outputs=args.fp8_convs)
    if args.full_res_frames is not None:
        pipe.vae.piece_frames = args.full_res_frames or None  # 0: whole calls
    frames_total = 9 + 12 * (args.chunks - 1)
    parity_frames = min(frames_total, 33)
    rows, kept = [], {}
    for size, mode in [(size, mode) for size in args.sizes for mode in args.offload]:
        # The policy of the mode (the pipeline's and the VAE's host copies pageable with --pageable).
        plan_lines: list[str] = []
        pipe.on_plan = plan_lines.append
        if mode == "auto":
            pipe.offload = "auto"
        else:
            pipe.policy = dataclasses.replace(OffloadPolicy.from_mode(mode), pinned=not args.pageable)
        height, width = SIZES[size]
        clip = synthetic_clip(frames_total, height, width, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if args.warmup:
            # Compile, cuDNN's search and the pinned host blocks of an offload mode (allocated
            # over the first chunks, then reused) are paid here, not by the first timed chunks.
            run_stream(pipe, clip[: 9 + 12 * 3], args.scale, keep=False)
            if device.type == "cuda":
                if args.memory_fraction and args.cap_after_warmup:
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
                torch.cuda.reset_peak_memory_stats()
        # (where the frames come out, deferred pushes): as asked, or the A/B(/C) repeated in this process.
        deferred = args.defer == "on"  # deferred pushes return frames in host memory
        asked = ("host" if args.host_outputs or args.push_all or deferred else "device", deferred)
        variants = {
            "ab": [("host", False), ("host", True)] * 2,
            "abc": [("device", False), ("host", False), ("host", True)] * 2,
        }.get(args.defer, [asked])
        for attempt, (outputs, defer) in enumerate(variants):
            pipe.output_device = torch.device("cpu") if outputs == "host" else device
            # Left on the device, an A/B's outputs are copied to host memory after each timed chunk (not piled up).
            on_device = outputs == "device" and args.defer == "abc"
            keep_device = torch.device("cpu") if args.outputs_on_cpu or on_device else None
            assert not (defer and outputs == "device"), "deferred pushes are timed with frames in host memory"
            peaks: list[float] = []
            hosts: list[float] = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = allocator_counts(device)
            if (args.memory_snapshot or args.retry_sites) and device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
            stream_out, times = run_stream(
                pipe,
                clip,
                args.scale,
                peaks,
                keep_device=keep_device,
                hosts=hosts,
                push_all=args.push_all,
                defer=defer,
            )
            if args.memory_snapshot and device.type == "cuda":
                torch.cuda.memory._dump_snapshot(str(args.memory_snapshot.with_suffix(f".{size}.{mode}.pickle")))
            if args.retry_sites and device.type == "cuda":
                print_retry_sites(torch.cuda.memory._snapshot())
            if (args.memory_snapshot or args.retry_sites) and device.type == "cuda":
                torch.cuda.memory._record_memory_history(enabled=None)
            allocator = {k: v - before.get(k, 0) for k, v in allocator_counts(device).items()}
            peak_alloc = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            peak_res = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
            steady = frames_total - 9
            fps_steady = steady / sum(times[1:]) if len(times) > 1 else float("nan")
            fps_all = frames_total / sum(times)
            stages = {} if args.no_stages else stage_times(pipe, clip, args.scale)
            row = {
                "size": size,
                "input": f"{width}x{height}",
                "output": f"{width * args.scale}x{height * args.scale}",
                "frames": frames_total,
                "fps_steady": round(fps_steady, 2),
                "fps_with_first": round(fps_all, 2),
                "first_chunk_s": round(times[0], 3),
                "peak_alloc_gib": round(peak_alloc, 2),
                "peak_reserved_gib": round(peak_res, 2),
                "stage_ms": {k: round(v * 1000, 1) for k, v in stages.items() if not k.endswith("_gib")},
                "stage_peak_gib": {k[:-9]: round(v, 2) for k, v in stages.items() if k.endswith("_peak_gib")},
                "tiled": pipe.vae.wants_tiling(-(-height * args.scale // 16) * 16, -(-width * args.scale // 16) * 16),
                "peak_after_chunk_gib": [round(p, 2) for p in peaks],
                "host_gib": round(max(hosts, default=0.0), 2),
                "offload": mode,
                "allocator": allocator,
            }
            if mode == "auto":
                row["offload_chosen"], row["plan"] = pipe.offload, list(plan_lines)
            if args.defer != "off":
                row["outputs"], row["defer"] = outputs, defer
            if attempt:  # the A/B's repeats: timings only
                print(json.dumps(row))
                continue
            if size in args.profile and device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    stage_times(pipe, clip, args.scale)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
            if args.flat_frames and device.type == "cuda":
                long_clip = synthetic_clip(12, height, width, device).repeat(-(-args.flat_frames // 12), 1, 1, 1)
                long_clip = long_clip[: args.flat_frames]
                torch.cuda.reset_peak_memory_stats()
                flat_peaks: list[float] = []
                flat_hosts: list[float] = []
                _, flat_times = run_stream(
                    pipe, long_clip, args.scale, flat_peaks, keep=False, hosts=flat_hosts, defer=defer
                )
                at_60 = flat_peaks[min(len(flat_peaks), 6) - 1]
                row["flat"] = {
                    "frames": args.flat_frames,
                    "peak_after_60_gib": round(at_60, 3),
                    "peak_final_gib": round(flat_peaks[-1], 3),
                    "growth_pct": round(100 * (flat_peaks[-1] / at_60 - 1), 3),
                    "host_after_60_gib": round(flat_hosts[min(len(flat_hosts), 6) - 1], 3),
                    "host_max_gib": round(max(flat_hosts), 3),
                    "fps_steady": round((args.flat_frames - 9) / sum(flat_times[1:]), 2),
                }
                del long_clip
            if size in args.seams:
                row["seams"] = seam_check(pipe, clip[: min(frames_total, 21)], args.scale, args.seam_settings)
            if args.parity:
                kept[size, mode] = (clip[:parity_frames].cpu(), stream_out[:parity_frames].cpu())
            del stream_out
            if pipe.vae.fast_options.split_conv:  # which block configuration each split-conv shape took (-1: cuDNN)
                row["split_conv"] = sorted(index for index in split_conv._chosen.values())
                row["split_conv_failures"] = split_conv._failures[:2]
            print(json.dumps(row))
            rows.append(row)
        del clip

    if args.parity and not args.models:
        # The float32 reference is built only now, so that it never sits in memory during the timed runs.
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)  # a memory cap is for the timed runs only
        reference = random_pipeline(device, torch.float32, tiny=args.tiny, fast=False)
        for row in rows:
            clip, out = kept[row["size"], row["offload"]]
            ref_out, _ = run_stream(reference, clip.to(device), args.scale)
            row["psnr_vs_fp32_db"] = round(psnr(out.to(device), ref_out), 2)
            print(
                json.dumps(
                    {
                        "size": row["size"],
                        "offload": row["offload"],
                        "psnr_vs_fp32_db": row["psnr_vs_fp32_db"],
                        "frames": len(out),
                    }
                )
            )
    if args.json:
        with args.json.open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": name, "dtype": str(dtype), "commit": commit}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
