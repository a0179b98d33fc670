"""Low-resolution inputs made on the fly from high-resolution clips: the paper's degradation, as far as it says.

InfVSR (section 4.1) trains on REDS with "the RealBasicVSR degradation pipeline" and says no more. RealBasicVSR
(Chan et al., 2022) is Real-ESRGAN's second-order pipeline applied to video: every frame of a clip gets the same
degradation parameters (so the clip stays temporally consistent), then video compression. What is implemented
here, each step with a range that the `Degradation` fields (and the command line) set:

1. blur: an anisotropic Gaussian kernel (sigmas in `blur_sigma`, random angle), size 2 * ceil(3 sigma) + 1 (at
   most 21);
2. resize by a random factor in `resize_scale`, the mode drawn from area / bilinear / bicubic;
3. noise: Gaussian (sigma in `noise_sigma`, in 8-bit levels) or Poisson (`poisson_scale`, with `poisson_prob`),
   grey (same on the three channels, `gray_noise_prob`) or colour, drawn anew for every frame;
4. JPEG compression of every frame at one quality from `jpeg_quality`;
5. with `second_order`, steps 1-3 again with the `*2` ranges (Real-ESRGAN's second degradation);
6. resize to exactly 1/scale of the clip (random mode), then H.264 compression of the clip at a CRF from
   `crf` (RealBasicVSR's video compression; libx264 through PyAV, one thread: the same bytes every run).

A range of (0, 0) switches its step off. Not implemented: Real-ESRGAN's generalized-Gaussian, plateau and sinc
kernels. `Degradation.bicubic()` is the plain bicubic downscale (clean synthetic pairs). Every random choice
comes from the `torch.Generator` passed in, so a seeded run degrades identically every time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

Range = tuple[float, float]
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class Degradation:
    """Ranges of the degradation steps (module docstring); the defaults follow RealBasicVSR / Real-ESRGAN."""

    scale: int = 4
    blur_sigma: Range = (0.2, 3.0)
    resize_scale: Range = (0.15, 1.5)
    noise_sigma: Range = (1.0, 30.0)
    poisson_scale: Range = (0.05, 3.0)
    poisson_prob: float = 0.4
    gray_noise_prob: float = 0.4
    jpeg_quality: Range = (30.0, 95.0)
    second_order: bool = True
    blur_sigma2: Range = (0.2, 1.5)
    resize_scale2: Range = (0.3, 1.2)
    noise_sigma2: Range = (1.0, 25.0)
    poisson_scale2: Range = (0.05, 2.5)
    crf: Range = (18.0, 35.0)

    @classmethod
    def bicubic(cls, scale: int = 4) -> Degradation:
        """No blur, noise or compression: the bicubic (antialiased) downscale only."""
        off = (0.0, 0.0)
        return cls(
            scale=scale,
            blur_sigma=off,
            resize_scale=off,
            noise_sigma=off,
            poisson_prob=0.0,
            jpeg_quality=off,
            second_order=False,
            crf=off,
        )

    def with_overrides(self, **ranges: Range | bool | None) -> Degradation:
        """A copy with the given fields replaced (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in ranges.items() if v is not None})


def _uniform(gen: torch.Generator, bounds: Range) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def _on(bounds: Range) -> bool:
    return bounds[1] > 0


def gaussian_kernel(sigma_x: float, sigma_y: float, angle: float, size: int) -> torch.Tensor:
    """A normalized (size, size) anisotropic Gaussian, rotated by `angle` radians."""
    half = size // 2
    axis = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).float()


def _blur(video: torch.Tensor, gen: torch.Generator, bounds: Range) -> torch.Tensor:
    """video (T, 3, H, W): one random kernel for the whole clip, reflect-padded."""
    sx, sy = _uniform(gen, bounds), _uniform(gen, bounds)
    angle = _uniform(gen, (-math.pi, math.pi))
    size = min(2 * math.ceil(3 * max(sx, sy)) + 1, 21)
    size = min(size, 2 * (min(video.shape[-2:]) // 2) - 1)  # reflect padding needs a margin smaller than the frame
    if size < 3:
        return video
    kernel = gaussian_kernel(sx, sy, angle, size).to(video)[None, None].expand(3, 1, size, size)
    padded = F.pad(video, (size // 2,) * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=3)


def _resize(video: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(video, size=size, mode="area")
    return F.interpolate(video, size=size, mode=mode, align_corners=False, antialias=True)


def _random_resize(video: torch.Tensor, gen: torch.Generator, bounds: Range) -> torch.Tensor:
    factor = _uniform(gen, bounds)
    mode = RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (), generator=gen))]
    size = (max(8, round(video.shape[-2] * factor)), max(8, round(video.shape[-1] * factor)))
    return _resize(video, size, mode).clamp(0, 1)


def _noise(
    video: torch.Tensor,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    sigma_bounds: Range,
    poisson_bounds: Range,
    spec: Degradation,
) -> torch.Tensor:
    """Noise of one random kind and strength for the clip, drawn by `noise_gen` on the frames' device."""
    gray = _chance(gen, spec.gray_noise_prob)
    frames, _, height, width = video.shape
    channels = 1 if gray else 3
    if _chance(gen, spec.poisson_prob) and _on(poisson_bounds):
        scale = _uniform(gen, poisson_bounds)
        source = video.mean(1, keepdim=True) if gray else video
        noise = (torch.poisson(source * 255, generator=noise_gen) / 255 - source) * scale
    elif _on(sigma_bounds):
        sigma = _uniform(gen, sigma_bounds) / 255
        noise = torch.randn(frames, channels, height, width, generator=noise_gen, device=video.device) * sigma
    else:
        return video
    return (video + noise).clamp(0, 1)


def _jpeg(video: torch.Tensor, quality: int) -> torch.Tensor:
    """Each frame through a JPEG encode/decode at `quality` (Pillow: deterministic)."""
    import numpy as np
    from PIL import Image

    out = []
    for frame in (video.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()))
    return torch.stack(out).to(video.device).permute(0, 3, 1, 2).float() / 255


def _h264(video: torch.Tensor, crf: int) -> torch.Tensor:
    """The clip through libx264 (yuv420p, one thread: deterministic) at `crf`, decoded back. The colour
    conversions are the project's own (io.color: BT.709 limited range, explicit chroma siting), not swscale's,
    whose SIMD paths may read the rows' padding: every byte that reaches the encoder is defined."""
    import av

    from ..io.color import FrameConverter, FrameEncoder

    frames, _, height, width = video.shape
    encoder = FrameEncoder("yuv420p")  # pads odd sizes by edge replication, as yuv420p needs even ones
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height = encoder.padded_size(width, height)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        rgb = (video.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).cpu() / 255  # 8-bit, as a video would be
        for frame in encoder.frames(rgb):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer, mode="r") as container:
        decoded = list(container.decode(video=0))
    if len(decoded) != frames:
        raise RuntimeError(f"H.264 round trip returned {len(decoded)} frames for {frames}")
    converter = FrameConverter(decoded[0], 0, codec="h264")
    out = converter.convert([converter.extract(frame) for frame in decoded])  # (T, H, W, 3) float in [0, 1]
    return out[:, :height, :width].to(video.device).permute(0, 3, 1, 2).contiguous()


def degrade(
    hr: torch.Tensor,
    gen: torch.Generator,
    spec: Degradation = Degradation(),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """High-resolution frames (T, H, W, 3) in [0, 1] -> low-resolution frames (T, H/scale, W/scale, 3) in [0, 1],
    on the CPU.

    H and W must be multiples of `spec.scale`. The steps and their ranges: the module docstring. The random
    choices come from `gen` (a CPU generator); blur, resizes and noise run on `device` (default: the frames'),
    the noise drawn by a generator there seeded from `gen`; the JPEG and H.264 round trips run on the CPU."""
    if hr.ndim != 4 or hr.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {tuple(hr.shape)}")
    height, width = hr.shape[1], hr.shape[2]
    if height % spec.scale or width % spec.scale:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the scale {spec.scale}")
    device = torch.device(device) if device is not None else hr.device
    video = hr.to(device).permute(0, 3, 1, 2).float()
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (), generator=gen)))
    orders = [(spec.blur_sigma, spec.resize_scale, spec.noise_sigma, spec.poisson_scale)]
    if spec.second_order:
        orders.append((spec.blur_sigma2, spec.resize_scale2, spec.noise_sigma2, spec.poisson_scale2))
    for index, (blur, resize, sigma, poisson) in enumerate(orders):
        if _on(blur):
            video = _blur(video, gen, blur)
        if _on(resize):
            video = _random_resize(video, gen, resize)
        video = _noise(video, gen, noise_gen, sigma, poisson, spec)
        if index == 0 and _on(spec.jpeg_quality):
            video = _jpeg(video, round(_uniform(gen, spec.jpeg_quality)))
    mode = "bicubic" if not _on(spec.resize_scale) else RESIZE_MODES[int(torch.randint(3, (), generator=gen))]
    video = _resize(video, (height // spec.scale, width // spec.scale), mode).clamp(0, 1)
    if _on(spec.crf):
        video = _h264(video, round(_uniform(gen, spec.crf)))
    return video.permute(0, 2, 3, 1).contiguous().cpu()
