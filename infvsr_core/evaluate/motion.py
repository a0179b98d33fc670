"""VBench's motion smoothness, from the AMT-S frame-interpolation network in a local amt-s.pth (never downloaded).

The measure (Huang et al. 2024, VBench; `vbench/motion_smoothness.py` of vbench 0.1.5): a video moves smoothly when
its in-between frames are what a frame interpolator predicts from their neighbours. VBench keeps the frames at even
indices, has AMT-S (Li et al. 2023, "AMT: All-Pairs Multi-Field Transforms for Efficient Frame Interpolation")
synthesise the frame half way between each two consecutive ones (t = 0.5), and compares each synthesised frame with
the real odd frame between them: the mean absolute difference of the 8-bit RGB values, d, gives
(255 - d) / 255, and the video's score is the mean over the odd frames that have a next even frame. Here that value
is the per-frame column of odd frame k (frames 2i and 2i + 2 predict frame 2i + 1); even frames have none, and the
column's mean is VBench's score.

The frames are prepared as VBench prepares them: 8-bit RGB (the evaluation's float frames rounded to 8 bits, which
gives back the decoded values of 8-bit footage), divided by 255, padded to multiples of 16 by repeating the edge
pixels (half of the padding before, the odd pixel after), interpolated, cropped back, then multiplied by 255 and
truncated to 8 bits (numpy's astype, not rounding).

VBench, on a GPU, shrinks large frames inside AMT-S by a factor it derives from the GPU's total memory (its
all-pairs correlation volume grows with the square of the frame area: from about 2.3 megapixels on a 24 GB GPU,
4K frames on an 80 GB one); on a CPU it never shrinks them. This module never does: its correlation lookup takes
the same numbers straight from the feature maps (correlation, average pooling and bilinear sampling are linear, so
sampling the pooled features and taking the dot product equals sampling the pooled volume), so memory stays that of
a few feature maps at any frame size. The values are therefore those of VBench's CPU path on any device, and of its
GPU path wherever VBench keeps the frame size.

Streaming: one even frame (the last interpolation input) and the odd frame after it are kept between chunks; the
value of a chunk's last odd frame comes with the next chunk (`late_values`). The parity is the video's: frames 0, 2,
4... are the inputs throughout. A triple of frames across a scene cut (the cut at k or k + 1 for odd k) compares two
shots: report.py keeps its value in the CSV and leaves it out of the summary (metric kind "interpolation").

Weights: VBench's published AMT-S checkpoint, amt-s.pth (a dict whose "state_dict" holds the network; a flat
state dict in the same key layout, .pth or .safetensors, also loads), read with weights_only=True and loaded with a
strict check of every key and shape. The layers are laid out under the key names of AMT's networks/AMT-S.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import check_layout, read_tensors

METRIC = "motion_smoothness"
MOTION_OPTIONS = {"amt": "--amt"}
"""Weight name (in EvaluateOptions.weights) -> the command-line option naming the local AMT-S file."""
AMT_FILE = "amt-s.pth"
"""The name VBench publishes the checkpoint under (VBench downloads it into ~/.cache/vbench/amt_model/)."""

PAD_MULTIPLE = 16  # AMT-S halves the frame four times
MIN_SIDE = 113
"""The smallest frame side with a value: padded to 128, AMT-S's coarsest correlation level (1/64) has 2 pixels a
side; with 1, AMT's sampler divides by zero and predicts NaN (VBench then scores garbage), so smaller frames get
no value."""
MIDPOINT = 0.5  # VBench interpolates the middle frame

# AMT-S's configuration (AMT's cfgs/AMT-S.yaml and networks/AMT-S.py)
_PYRAMID = (20, 32, 44, 56)  # channels of the context pyramid at 1/2, 1/4, 1/8, 1/16 of the frame size
_SIDE = 20  # channels a residual block's side branch refines
_FLOWS = 3  # flow fields per side predicted at full resolution, blended by comb_block
_CORR_RADIUS = 3
_CORR_LEVELS = 4
_CORR_FEATURES = 84
_UPDATE = {"hidden": 76, "flow": 20, "corr": 64, "fc": 68}
_LOOKUP_BUDGET = 1 << 25  # sampled feature values held at once by the correlation lookup (bounds its memory)


# -- the network ---------------------------------------------------------------------------------------------------


def _conv_prelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """A 3x3 convolution and a per-channel PReLU (AMT's convrelu: keys 0.weight, 0.bias, 1.weight)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.PReLU(c_out))


def _bilinear(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`image` sampled at each pixel plus `flow` (pixels, x then y), bilinear, edge values beyond the border."""
    b, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(b, 1, h, w)
    ys = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(b, 1, h, w)
    base = torch.cat([xs, ys], 1).to(image)
    shift = torch.cat([flow[:, 0:1] / ((w - 1.0) / 2.0), flow[:, 1:2] / ((h - 1.0) / 2.0)], 1)
    grid = (base + shift).permute(0, 2, 3, 1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


class _Bottleneck(nn.Module):
    """The correlation encoder's residual bottleneck (1x1, 3x3, 1x1), instance-normalised, with a strided 1x1
    shortcut when it halves the size (the norms have no weights, so only the convolutions have keys)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        mid = c_out // 4
        self.conv1 = nn.Conv2d(c_in, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1)
        self.conv3 = nn.Conv2d(mid, c_out, 1)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride)) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in (self.conv1, self.conv2, self.conv3):
            y = F.relu(F.instance_norm(conv(y)))
        shortcut = x if self.downsample is None else F.instance_norm(self.downsample(x))
        return F.relu(shortcut + y)


class _CorrelationEncoder(nn.Module):
    """RAFT's small feature encoder (instance norm): features at 1/8 of the frame size for the correlation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 3)
        widths = ((32, 32, 1), (32, 64, 2), (64, 96, 2))
        for index, (c_in, c_out, stride) in enumerate(widths, 1):
            stage = nn.Sequential(_Bottleneck(c_in, c_out, stride), _Bottleneck(c_out, c_out, 1))
            self.add_module(f"layer{index}", stage)
        self.conv2 = nn.Conv2d(96, _CORR_FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.instance_norm(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class _ContextPyramid(nn.Module):
    """Four stride-2 stages of two PReLU convolutions: the features the decoders warp (1/2 .. 1/16 size)."""

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for index, c_out in enumerate(_PYRAMID, 1):
            self.add_module(f"pyramid{index}", nn.Sequential(_conv_prelu(c_in, c_out, 2), _conv_prelu(c_out, c_out)))
            c_in = c_out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for index in range(1, len(_PYRAMID) + 1):
            x = getattr(self, f"pyramid{index}")(x)
            levels.append(x)
        return levels


class _SideResidual(nn.Module):
    """IFRNet's residual block: the last `_SIDE` channels get an extra convolution between the main ones."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_prelu(channels, channels)
        self.conv2 = _conv_prelu(_SIDE, _SIDE)
        self.conv3 = _conv_prelu(channels, channels)
        self.conv4 = _conv_prelu(_SIDE, _SIDE)
        self.conv5 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.prelu = nn.PReLU(channels)

    def _side(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return torch.cat([x[:, :-_SIDE], conv(x[:, -_SIDE:])], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._side(self.conv1(x), self.conv2)
        y = self._side(self.conv3(y), self.conv4)
        return self.prelu(x + self.conv5(y))


class _Decoder(nn.Module):
    """One coarse-to-fine stage: convolution, residual block, and a transposed convolution that doubles the size
    (its output: the two flows from the middle frame, then either the middle frame's features or, at the last
    stage, the multi-field flows, blend masks and residual colours)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int) -> None:
        super().__init__()
        self.convblock = nn.Sequential(
            _conv_prelu(c_in, c_mid), _SideResidual(c_mid), nn.ConvTranspose2d(c_mid, c_out, 4, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convblock(x)


class _FlowUpdate(nn.Module):
    """The correlation-guided refinement: from the looked-up correlations, the current flows and the middle frame's
    features, a residual for both (computed at 1/8 size; `factor` brings finer stages down to it and back)."""

    def __init__(self, features: int, factor: int | None) -> None:
        super().__init__()
        self.factor = factor
        corr_planes = 2 * _CORR_LEVELS * (2 * _CORR_RADIUS + 1) ** 2
        hidden, flow, corr, fc = _UPDATE["hidden"], _UPDATE["flow"], _UPDATE["corr"], _UPDATE["fc"]
        self.convc1 = nn.Conv2d(corr_planes, corr, 1)
        self.convf1 = nn.Conv2d(4, 2 * flow, 7, padding=3)
        self.convf2 = nn.Conv2d(2 * flow, flow, 3, padding=1)
        self.conv = nn.Conv2d(corr + flow, fc, 3, padding=1)

        def two_convs(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, hidden, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(hidden, c_out, 3, padding=1)
            )

        self.gru = two_convs(fc + 4 + features, hidden)  # named so in AMT, though it is two plain convolutions
        self.feat_head = two_convs(hidden, features)
        self.flow_head = two_convs(hidden, 4)

    def forward(
        self, features: torch.Tensor, flows: torch.Tensor, corr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factor is not None:
            features = _bilinear(features, 1 / self.factor)
        motion = F.leaky_relu(self.convf2(F.leaky_relu(self.convf1(flows), 0.1)), 0.1)
        mixed = torch.cat([F.leaky_relu(self.convc1(corr), 0.1), motion], 1)
        state = self.gru(torch.cat([F.leaky_relu(self.conv(mixed), 0.1), flows, features], 1))
        delta_features, delta_flows = self.feat_head(state), self.flow_head(state)
        if self.factor is not None:
            delta_features = _bilinear(delta_features, self.factor)
            delta_flows = self.factor * _bilinear(delta_flows, self.factor)
        return delta_features, delta_flows


class _CorrelationLookup:
    """RAFT's bidirectional all-pairs correlation, looked up around given positions, without the all-pairs volume.

    For each pixel p of one frame's 1/8-size features and each pyramid level l, the 7x7 window of correlations
    (dot products divided by sqrt(channels)) with the other frame's features average-pooled l times, sampled
    bilinearly (zero outside) around position(p) / 2^l. The window's (i, j) entry lies i - 3 along x and j - 3
    along y: RAFT's ordering, which the trained convc1 expects.
    """

    def __init__(self, features0: torch.Tensor, features1: torch.Tensor) -> None:
        self.features = (features0, features1)
        self.pyramids: tuple[list[torch.Tensor], list[torch.Tensor]] = ([features0], [features1])
        for pyramid in self.pyramids:
            for _ in range(_CORR_LEVELS - 1):
                pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
        span = torch.linspace(-_CORR_RADIUS, _CORR_RADIUS, 2 * _CORR_RADIUS + 1, device=features0.device)
        self.dx = span.view(-1, 1).expand(span.numel(), span.numel()).reshape(-1)
        self.dy = span.view(1, -1).expand(span.numel(), span.numel()).reshape(-1)

    def __call__(self, positions0: torch.Tensor, positions1: torch.Tensor) -> torch.Tensor:
        """Frame 0's features against frame 1's around `positions0`, then frame 1's against frame 0's around
        `positions1`: (B, 2 x levels x 49, h, w)."""
        return torch.cat(
            [self._window(self.features[0], self.pyramids[1], positions0),
             self._window(self.features[1], self.pyramids[0], positions1)], 1
        )  # fmt: skip

    def _window(self, query: torch.Tensor, pyramid: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        b, c, h, w = query.shape
        taps = self.dx.numel()
        rows = max(1, _LOOKUP_BUDGET // max(1, b * c * w * taps))
        norm = torch.tensor(c, dtype=torch.float32).sqrt().to(query.device)
        levels = []
        for level, target in enumerate(pyramid):
            th, tw = target.shape[-2:]
            x = positions[:, 0, :, :, None] / 2**level + self.dx  # (B, h, w, 49)
            y = positions[:, 1, :, :, None] / 2**level + self.dy
            grid = torch.stack([2 * x / (tw - 1) - 1, 2 * y / (th - 1) - 1], -1)
            parts = []
            for top in range(0, h, rows):
                block = grid[:, top : top + rows]
                n = block.shape[1]
                sampled = F.grid_sample(target, block.reshape(b, n, w * taps, 2), align_corners=True)
                dots = (sampled.view(b, c, n, w, taps) * query[:, :, top : top + n, :, None]).sum(1)
                parts.append(dots / norm)
            levels.append(torch.cat(parts, 1).permute(0, 3, 1, 2))
        return torch.cat(levels, 1)


class AmtS(nn.Module):
    """AMT-S: predicts the frame at time t between two frames in [0, 1], (B, 3, H, W) with H, W multiples of 16.

    Flows from the middle frame to both inputs are estimated coarse to fine (1/16 to full size), each stage refined
    by correlations looked up where the flows point; three flow pairs at full size warp both frames, blended by
    learned masks plus a residual colour, and a small convolution combines the three candidates.
    """

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = _PYRAMID
        self.feat_encoder = _CorrelationEncoder()
        self.encoder = _ContextPyramid()
        self.decoder4 = _Decoder(2 * c4 + 1, 2 * c4, c3 + 4)
        self.decoder3 = _Decoder(3 * c3 + 4, 3 * c3, c2 + 4)
        self.decoder2 = _Decoder(3 * c2 + 4, 3 * c2, c1 + 4)
        self.decoder1 = _Decoder(3 * c1 + 4, 3 * c1, 8 * _FLOWS)
        self.update4 = _FlowUpdate(c3, None)
        self.update3 = _FlowUpdate(c2, 2)
        self.update2 = _FlowUpdate(c1, 4)
        self.comb_block = nn.Sequential(
            nn.Conv2d(3 * _FLOWS, 6 * _FLOWS, 3, 1, 1), nn.PReLU(6 * _FLOWS), nn.Conv2d(6 * _FLOWS, 3, 3, 1, 1)
        )

    def _refine(self, update: _FlowUpdate, lookup: _CorrelationLookup, grid: torch.Tensor, t: float,
                flow0: torch.Tensor, flow1: torch.Tensor, features: torch.Tensor,
                reduce: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """A stage's flows (at `reduce` times the 1/8 size) corrected by the correlation where they point."""
        small0, small1 = flow0, flow1
        if reduce != 1:
            small0 = _bilinear(flow0, 1 / reduce) / reduce
            small1 = _bilinear(flow1, 1 / reduce) / reduce
        # Linear motion: the flow t -> 1 divided by t is the flow 0 -> 1 (and t -> 0 divided by 1 - t is 1 -> 0).
        corr = lookup(grid + small1 / t, grid + small0 / (1 - t))
        delta_features, delta_flows = update(features, torch.cat([small0, small1], 1), corr)
        return flow0 + delta_flows[:, :2], flow1 + delta_flows[:, 2:], features + delta_features

    def _stage(self, decoder: _Decoder, features: torch.Tensor, context0: torch.Tensor, context1: torch.Tensor,
               flow0: torch.Tensor, flow1: torch.Tensor) -> torch.Tensor:  # fmt: skip
        inputs = [features, backward_warp(context0, flow0), backward_warp(context1, flow1), flow0, flow1]
        return decoder(torch.cat(inputs, 1))

    def forward(self, frame0: torch.Tensor, frame1: torch.Tensor, t: float = MIDPOINT) -> torch.Tensor:
        b, _, h, w = frame0.shape
        # The pair's mean colour is taken out (channels, then rows, then columns: AMT's order) and put back last.
        mean = torch.cat([frame0, frame1], 2).mean(1, keepdim=True).mean(2, keepdim=True).mean(3, keepdim=True)
        frame0, frame1 = frame0 - mean, frame1 - mean
        ys, xs = torch.meshgrid(
            torch.arange(h // 8, device=frame0.device), torch.arange(w // 8, device=frame0.device), indexing="ij"
        )
        grid = torch.stack([xs, ys]).float()[None].expand(b, 2, h // 8, w // 8)
        corr0, corr1 = torch.split(self.feat_encoder(torch.cat([frame0, frame1])), b)
        lookup = _CorrelationLookup(corr0, corr1)
        context0, context1 = self.encoder(frame0), self.encoder(frame1)

        time = torch.full((b, 1, *context0[3].shape[-2:]), t, dtype=frame0.dtype, device=frame0.device)
        out = self.decoder4(torch.cat([context0[3], context1[3], time], 1))
        flow0, flow1, features = self._refine(self.update4, lookup, grid, t, out[:, :2], out[:, 2:4], out[:, 4:], 1)
        finer = ((2, self.decoder3, self.update3, 2), (1, self.decoder2, self.update2, 4))
        for level, decoder, update, reduce in finer:
            out = self._stage(decoder, features, context0[level], context1[level], flow0, flow1)
            flow0 = out[:, :2] + 2.0 * _bilinear(flow0, 2.0)
            flow1 = out[:, 2:4] + 2.0 * _bilinear(flow1, 2.0)
            flow0, flow1, features = self._refine(update, lookup, grid, t, flow0, flow1, out[:, 4:], reduce)

        out = self._stage(self.decoder1, features, context0[0], context1[0], flow0, flow1)
        n = _FLOWS
        delta0, delta1, mask, residual = torch.split(out, [2 * n, 2 * n, n, 3 * n], 1)
        flows0 = (delta0 + 2.0 * _bilinear(flow0, 2.0).repeat(1, n, 1, 1)).reshape(b * n, 2, h, w)
        flows1 = (delta1 + 2.0 * _bilinear(flow1, 2.0).repeat(1, n, 1, 1)).reshape(b * n, 2, h, w)
        mask = torch.sigmoid(mask).reshape(b * n, 1, h, w)
        warped0 = backward_warp(frame0.repeat_interleave(n, 0), flows0)
        warped1 = backward_warp(frame1.repeat_interleave(n, 0), flows1)
        candidates = mask * warped0 + (1 - mask) * warped1 + mean.repeat_interleave(n, 0)
        candidates = (candidates + residual.reshape(b * n, 3, h, w)).reshape(b, n * 3, h, w)
        blended = candidates.view(b, n, 3, h, w).mean(1) + self.comb_block(candidates)
        return blended.clamp(0, 1)


# -- the weight file -----------------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The published file keeps its state dict under "state_dict" (training checkpoints add more keys); a flat
    state dict (.pth or .safetensors) is taken too."""
    return read_tensors(
        path,
        MOTION_OPTIONS["amt"],
        hint=f"VBench's AMT-S checkpoint, {AMT_FILE}",
        nested="state_dict",
        layout=f"AMT-S's state dict (as {AMT_FILE}: a dict with 'state_dict', names -> tensors)",
    )


def load_amt(path: Path, device: torch.device | str = "cpu") -> AmtS:
    """AMT-S from `path`, every key and shape checked (strict), or one error naming the file and what is wrong."""
    model = AmtS()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = _read_state(Path(path))
    what = (
        f"AMT-S in the key layout of VBench's {AMT_FILE} "
        "(feat_encoder.*, encoder.pyramidN.*, decoderN.*, updateN.*, comb_block.*)"
    )
    check_layout(Path(path), MOTION_OPTIONS["amt"], found, expected, what)
    model.load_state_dict({k: found[k].float() for k in expected}, strict=True)
    return model.to(device).eval()


# -- the metric ----------------------------------------------------------------------------------------------------


def to_8bit(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) float in [0, 1] -> uint8, rounded: 8-bit footage decoded to floats comes back exactly."""
    return (frames.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def pad_amounts(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) edge repetition up to multiples of `multiple`; the odd pixel goes right/bottom."""
    ph, pw = -height % multiple, -width % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def frame_score(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """(255 - mean |predicted - actual|) / 255 of two 8-bit frames: 1 for a perfect prediction."""
    difference = (predicted.to(torch.int16) - actual.to(torch.int16)).abs().sum(dtype=torch.int64)
    return (255.0 - float(difference) / actual.numel()) / 255.0


class MotionSmoothness:
    """VBench's motion smoothness per odd frame, streamed (the push / cut protocol of the other network metrics)."""

    name = METRIC

    def __init__(self, network: AmtS, device: torch.device) -> None:
        self.network, self.device = network, device
        self.seen = 0
        self.pad: tuple[int, int, int, int] | None = None
        self.anchor: torch.Tensor | None = None  # the last even frame, padded, (1, 3, H', W') in [0, 1]
        self.between: tuple[int, torch.Tensor] | None = None  # the odd frame after it (index, 8-bit (H, W, 3))
        self._late: list[tuple[int, str, float]] = []

    def _prepare(self, frame: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            self.pad = pad_amounts(int(frame.shape[0]), int(frame.shape[1]))
        x = frame.to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return F.pad(x, self.pad, mode="replicate")

    def interpolate(self, anchor: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """The predicted middle frame, cropped back and truncated to 8 bits, (H, W, 3) uint8."""
        assert self.pad is not None
        left, right, top, bottom = self.pad
        predicted = self.network(anchor, following, MIDPOINT)[0]
        h, w = predicted.shape[-2:]
        predicted = predicted[:, top : h - bottom, left : w - right]
        return (predicted * 255.0).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)

    @torch.inference_mode()
    def push(self, output: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        frames = to_8bit(output)
        values = np.full(int(frames.shape[0]), math.nan)
        for offset, frame in enumerate(frames):
            index = self.seen + offset
            if index % 2:
                self.between = (index, frame)
                continue
            current = self._prepare(frame)
            if self.anchor is not None and self.between is not None:
                middle, actual = self.between
                value = frame_score(self.interpolate(self.anchor, current), actual.to(self.device))
                if middle >= self.seen:
                    values[middle - self.seen] = value
                else:  # the odd frame ended the previous chunk
                    self._late.append((middle, self.name, value))
            self.anchor, self.between = current, None
        self.seen += int(frames.shape[0])
        return {self.name: values}

    def late_values(self) -> list[tuple[int, str, float]]:
        """Values of frames of earlier chunks that this chunk completed: (frame, metric, value)."""
        late, self._late = self._late, []
        return late

    def cut(self, index: int) -> list[tuple[int, str, float]]:
        return []  # the values across a cut stay in the CSV; report.py leaves them out of the summary


def load_motion(
    path: Path | None, device: torch.device, width: int, height: int
) -> tuple[MotionSmoothness | None, dict[str, str]]:
    """The metric when `path` names AMT-S's weights and the frames are large enough; otherwise one line saying why
    it is left out (a given file is checked either way, so a wrong one is reported before a long run)."""
    if path is None:
        return None, {
            METRIC: f"no {MOTION_OPTIONS['amt']} file given (VBench's AMT-S checkpoint {AMT_FILE}; nothing is "
            "downloaded)"
        }
    network = load_amt(Path(path), device)
    if min(width, height) < MIN_SIDE:
        return None, {METRIC: f"{width}x{height} frames: AMT-S needs at least {MIN_SIDE} pixels a side"}
    return MotionSmoothness(network, device), {}
