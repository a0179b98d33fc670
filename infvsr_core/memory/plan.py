"""How much memory a frame size needs, checked before the first chunk runs.

A stream's state grows with the output frame: the VAE's causal histories (two
frames of every causal convolution's input, at every resolution level) and the
DiT's rolling KV cache (the previous chunk's tokens in every layer). A frame
size whose state cannot fit anywhere fails only after minutes of climbing
memory; this module says so before any work, and says what would fit.

The figures are lower bounds of the unavoidable state, not the peak: the check
refuses only what cannot work, never what might.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import OutOfMemoryPlan, UsageError

GIB = 1024**3

# Bytes of VAE history per output pixel, per channel of the VAE's base width, per byte of the dtype: the sum over
# every causal convolution of its two cached input frames at its level's resolution (calibrated against the
# histories the bench measures; see bench/RESULTS.md).
HISTORY_BYTES_PER_PIXEL_CHANNEL = 40
LATENT_FRAMES_PER_CHUNK = 3  # 12 frames at the VAE's 4x temporal compression
TOKEN_PIXELS = 16 * 16  # 8x spatial VAE compression times the DiT's 2x2 patches
OUTPUT_CHUNK_FRAMES = 12


@dataclass(frozen=True)
class MemoryNeed:
    """Lower bounds, in bytes, of one stream's state on the compute device and in host memory."""

    device: int
    host: int
    histories: int
    kv_cache: int


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _state_bytes(pipe, height: int, width: int, tile_overlap: float = 1.0) -> tuple[int, int]:
    """(VAE histories, KV cache) of a stream of `height` x `width` output frames, in bytes; `tile_overlap` scales
    the histories for tiles that overlap (each tile keeps its own)."""
    size = _dtype_bytes(pipe.dtype)
    pixels = height * width
    base_dim = int(pipe.vae.vae.config.base_dim)
    histories = int(HISTORY_BYTES_PER_PIXEL_CHANNEL * base_dim * size * pixels * tile_overlap)
    config = pipe.dit.config
    kv_cache = 2 * config.num_layers * config.dim * size * LATENT_FRAMES_PER_CHUNK * math.ceil(pixels / TOKEN_PIXELS)
    return histories, kv_cache


def _state_on_device(policy, histories: int, kv_cache: int) -> int:
    """The part of a stream's state that `policy` keeps on the compute device."""
    return (0 if policy.vae_histories_on_host else histories) + (0 if policy.kv_cache_on_host else kv_cache)


def _planned_policy(pipe):
    """The policy a stream will run with: offload="auto" may go as far as its lightest mode, so a size is judged
    by that mode (the plan picks a faster one at the first chunk when it fits)."""
    from .policy import OffloadPolicy

    return OffloadPolicy.from_mode(AUTO_ORDER[-1]) if getattr(pipe, "auto_offload", False) else pipe.policy


def stream_need(pipe, height: int, width: int, spill: bool = False) -> MemoryNeed:
    """The state of a stream whose output frames are `height` x `width`, placed as the pipeline will place it
    (`_planned_policy`); `spill`: offloaded histories may go to disk (a spill folder is set, or will be)."""
    histories, kv_cache = _state_bytes(pipe, height, width)
    output = OUTPUT_CHUNK_FRAMES * height * width * 3 * 4  # one chunk of float32 frames handed to the caller
    policy = _planned_policy(pipe)
    spilled = histories if spill and policy.vae_histories_on_host else 0
    if pipe.device.type == "cpu":
        return MemoryNeed(0, histories + kv_cache + output - spilled, histories, kv_cache)
    on_device = _state_on_device(policy, histories, kv_cache)
    on_host = histories + kv_cache - on_device - spilled  # what does not fit the host budget goes to disk
    return MemoryNeed(on_device, on_host + output, histories, kv_cache)


def available_memory(device: torch.device) -> tuple[int | None, int]:
    """(free device memory, or None for the CPU; available host memory), in bytes."""
    host = _host_available()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    return None, host


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never refuse on a guess


def check_fits(pipe, input_height: int, input_width: int, scale: int) -> None:
    """Raise OutOfMemoryPlan with what would fit when a stream of this input size cannot fit this machine."""
    # Offloaded histories that outgrow host memory go to disk (`spill_budget`), so only the rest must fit there.
    spill = getattr(pipe.vae, "spill", None) is not None or _planned_policy(pipe).vae_histories_on_host
    height, width = input_height * scale, input_width * scale
    need = stream_need(pipe, height, width, spill)
    device_free, host_free = available_memory(pipe.device)
    short = []
    if device_free is not None and need.device > device_free:
        short.append(f"{need.device / GIB:.1f} GiB of GPU memory ({device_free / GIB:.1f} GiB free)")
    if need.host > host_free:
        short.append(f"{need.host / GIB:.1f} GiB of host memory ({host_free / GIB:.1f} GiB available)")
    if not short:
        return
    # The state grows with the output's pixels: scale the input down by the shortfall's square root.
    worst = max(
        need.host / max(host_free, 1),
        need.device / max(device_free, 1) if device_free is not None else 0.0,
    )
    shrink = 1.0 / math.sqrt(worst)
    fit_w = max(8, int(input_width * shrink) // 8 * 8)
    fit_h = max(8, int(input_height * shrink) // 8 * 8)
    hints = [f"an input of at most about {fit_w}x{fit_h} at --scale {scale} (downscale the video first)"]
    if scale > 1:
        hints.append("a smaller --scale")
    if pipe.device.type == "cuda" and device_free is not None and need.device > device_free:
        hints.append("--offload state or all (stream state in host memory)")
    raise OutOfMemoryPlan(
        f"a {input_width}x{input_height} input at --scale {scale} gives {width}x{height} frames whose stream state "
        f"alone needs at least {' and '.join(short)}; what would fit: {'; '.join(hints)}"
    )


# Working memory of a chunk beyond its state (activations, cuDNN workspaces, the allocator's slack), per pixel of
# the frame or tile the VAE runs on, per channel of the VAE's base width, per byte of the dtype (calibrated, with
# the margin below, so that the bench's measured peaks fall under the estimate; see bench/RESULTS.md).
ACTIVATION_BYTES_PER_PIXEL_CHANNEL = 24
PLAN_MARGIN = 1.25
# Modes that keep VAE histories in host memory upload the history of the frame (or tile) being decoded, and the
# next tile's ahead of it: this share of a frame's (tile's) history is on the device at the peak (calibrated on the
# bench's measured `state` peaks at 480p, 720p and tiled 1080p; bench/RESULTS.md round 15).
RESIDENT_HISTORY_SHARE = 0.4
AUTO_ORDER = ("none", "state", "all")
"""Modes `auto` considers, fastest first ("histories" is never faster than "state" where measured)."""


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _decoded_pixels(pipe, height: int, width: int) -> int:
    """Pixels of what the VAE decodes in one call: the frame, or one tile of it."""
    vae = pipe.vae
    pixels = height * width
    return min(pixels, (vae.tile_size * 8) ** 2) if vae.wants_tiling(height, width) else pixels


def activation_bytes(pipe, height: int, width: int) -> int:
    """A chunk's working memory beyond the stream's state (activations of the frame, or of one tile)."""
    per_pixel = ACTIVATION_BYTES_PER_PIXEL_CHANNEL * int(pipe.vae.vae.config.base_dim) * _dtype_bytes(pipe.dtype)
    return per_pixel * _decoded_pixels(pipe, height, width)


def resident_history_bytes(pipe, height: int, width: int, prefetch: bool) -> int:
    """Offloaded VAE history on the device while a chunk decodes (its frame's or tile's, and with `prefetch` the
    next tile's)."""
    units = 2 if prefetch and pipe.vae.wants_tiling(height, width) else 1
    return int(RESIDENT_HISTORY_SHARE * units * _state_bytes(pipe, _decoded_pixels(pipe, height, width), 1)[0])


def device_need(pipe, height: int, width: int, mode: str) -> int:
    """Estimated peak device memory of a stream of `height` x `width` output frames in offload `mode`."""
    from .policy import OffloadPolicy

    policy = OffloadPolicy.from_mode(mode)
    vae = pipe.vae
    overlap = (vae.tile_size / vae.tile_stride) ** 2 if vae.wants_tiling(height, width) else 1.0
    histories, kv_cache = _state_bytes(pipe, height, width, overlap)
    weights = _module_bytes(vae.vae)
    weights += 0 if policy.dit_weights_on_host else _module_bytes(pipe.dit)
    weights += 0 if policy.guidance_weights_on_host else _module_bytes(pipe.guidance)
    state = _state_on_device(policy, histories, kv_cache)
    resident = resident_history_bytes(pipe, height, width, policy.prefetch) if policy.vae_histories_on_host else 0
    return int(PLAN_MARGIN * (weights + state + activation_bytes(pipe, height, width))) + resident


def _memory_fraction(device: torch.device) -> float:
    """The per-process cap as a share of the device (1.0: none). Why the guard: not every allocator backend
    answers (cudaMallocAsync, which ComfyUI selects on many GPUs, has no such cap)."""
    try:
        return float(torch.cuda.get_per_process_memory_fraction(device))
    except (RuntimeError, AttributeError):
        return 1.0


def pick_mode(needs: dict[str, int], free: int) -> str | None:
    """The first mode of `AUTO_ORDER` whose need fits `free` bytes (None: none fits)."""
    return next((mode for mode in AUTO_ORDER if needs[mode] <= free), None)


def choose_mode(pipe, height: int, width: int, free: int | None = None) -> tuple[str, str]:
    """The fastest offload mode whose estimated peak fits the device, and one line saying why.

    `free` is the device memory the stream may use (default: what the device has free now, plus what
    PyTorch's cache already holds, the pipeline's weights included, since all of it is the stream's to use)."""
    if free is None:
        if pipe.device.type != "cuda":
            return "none", "not a GPU: every mode keeps everything in the same memory"
        device = _indexed(pipe.device)
        free_now, total = torch.cuda.mem_get_info(device)
        free = int(free_now) + int(torch.cuda.memory_reserved(device))
        # A per-process cap (torch.cuda.set_per_process_memory_fraction: a shared GPU, or a test of a smaller
        # card) bounds what the allocator will hand out, whatever the device has free.
        free = min(free, int(_memory_fraction(device) * total))
    needs = {mode: device_need(pipe, height, width, mode) for mode in AUTO_ORDER}
    mode = pick_mode(needs, free)
    if mode is None:
        return AUTO_ORDER[-1], (
            f"{width}x{height} output needs about {needs[AUTO_ORDER[-1]] / GIB:.1f} GiB even with offload='all', "
            f"{free / GIB:.1f} GiB available: trying anyway"
        )
    return mode, f"{width}x{height} output needs about {needs[mode] / GIB:.1f} GiB, {free / GIB:.1f} GiB available"


# Host memory the offloaded histories may take before the rest goes to disk: a share of what is available when a
# size's first chunk is planned, leaving room for the reader's and writer's queues, page-locked staging blocks and
# whatever else the machine runs (ComfyUI's other models, the OS's file cache).
HOST_SHARE = 0.6


def spill_budget(histories: int, host_available: int) -> int | None:
    """Bytes of offloaded histories to keep in host memory, the rest spilled to disk; None when they all fit."""
    budget = int(HOST_SHARE * host_available)
    return None if histories <= budget else budget


def plan_spill(pipe, height: int, width: int) -> tuple[int, str] | None:
    """(host budget in bytes, one line saying why) when the offloaded VAE histories of a stream of `height` x
    `width` output frames would not fit host memory; None when they fit, are not offloaded, or a spill is set."""
    if not pipe.policy.vae_histories_on_host or pipe.vae.spill is not None:
        return None
    vae = pipe.vae
    overlap = (vae.tile_size / vae.tile_stride) ** 2 if vae.wants_tiling(height, width) else 1.0
    histories, _kv_cache = _state_bytes(pipe, height, width, overlap)
    _device, host = available_memory(pipe.device)
    budget = spill_budget(histories, host)
    if budget is None:
        return None
    return budget, (
        f"{width}x{height} output's offloaded histories need about {histories / GIB:.1f} GiB of host memory, "
        f"{host / GIB:.1f} GiB available: past {budget / GIB:.1f} GiB they go to disk"
    )


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the device it means (the allocator's per-device calls want an index)."""
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def cap_device_memory(device: str | torch.device | None, gib: float) -> None:
    """Let PyTorch's allocator hand out at most `gib` GiB of the GPU (`set_per_process_memory_fraction`), which
    `choose_mode` then plans for: a GPU shared with other programs, or a smaller card's budget on a larger one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        raise UsageError(f"a GPU memory cap needs a CUDA device, not {device}")
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < gib * GIB <= total:
        raise UsageError(f"the GPU memory cap must be above 0 and at most the GPU's {total / GIB:.1f} GiB, not {gib}")
    torch.cuda.set_per_process_memory_fraction(gib * GIB / total, device)


_GROWABLE: list[bool] = []


def use_growable_segments() -> str | None:
    """Switch PyTorch's caching allocator to expandable segments, once, unless the user configured the allocator
    (PYTORCH_CUDA_ALLOC_CONF set, or another backend such as ComfyUI's cudaMallocAsync); returns a line saying so.

    Why: the offloaded modes allocate and free blocks of many sizes, and near a card's limit the default
    allocator fails on fragmentation (reserved memory it cannot use, measured in bench/RESULTS.md) where
    growable segments fit. The command line sets it before torch loads; inside ComfyUI, torch is loaded first,
    so `auto` sets it at its first plan. Blocks already reserved keep their kind; new ones grow."""
    if _GROWABLE or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or not torch.cuda.is_available():
        return None
    _GROWABLE.append(True)
    try:
        if torch.cuda.get_allocator_backend() != "native":
            return None
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # a build without the switch: plan as before
        return None
    return "PyTorch's allocator set to expandable segments (set PYTORCH_CUDA_ALLOC_CONF to choose otherwise)"
