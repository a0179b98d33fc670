"""GPU check of the float8 causal conv (infvsr_core/kernels/fp8_conv.py, issue 21) on the decoder's 3x3x3 shapes.

    python bench/check_fp8_conv.py [--sizes 720p 1080p] [--shapes 0 3] [--sweep] [--json FILE]

Shapes: every causal 3x3x3 conv of Wan2.1's decoder with at least 32 input channels (its resblocks), read off
diffusers' model (built on the meta device), at the frame counts of a steady chunk's decoder call as
StreamingVAE plans them in float8 with resident histories: 720p is below WHOLE_CHUNK_PIXELS_FP8, so a whole chunk's
CHUNK_FRAMES / TEMPORAL_FACTOR latent frames per call, the full-resolution stage in pieces of 4 frames; 1080p runs
in 128-latent tiles (1024 x 1024 output pixels), each call a whole chunk's latent frames, unsplit. Inputs are
norm + SiLU outputs (random gammas as in `random_vae_state_dict`), in front of them the 2 history frames, as the
decoder stages them.

Per shape, milliseconds per call (`check_scaled_mm.timed`: 20 back-to-back calls after a warm run, CUDA
events, median of 3), each against a float32 conv of the unquantized operands (TF32 off), relative Frobenius
error:
- cudnn: bf16 F.conv3d on the staged buffer as the product runs it (96 outputs computed as 128; no bias: the
  product adds it in the next pass);
- split: the product's bf16 Triton kernel (kernels/split_conv.py, bias in its epilogue) where it runs;
- quantize: `quantize_staged` alone with the dynamic scale (an amax reduction, then the cast pass);
- fp8 dynamic: `quantize_staged` + `fp8_conv` (bias in the epilogue): the path for inputs that are not norm
  outputs;
- fp8 static: `fp8_conv` alone on a buffer cast with `static_activation_scale` (in the product that cast would
  be the norm pass's own store: no extra pass); its outputs stored element by element (the product's) and
  through the copy engine (`fp8_static_tma_ms`), and for 96 input channels in the row form
  (`fp8_static_rows_ms`: `FastForwardOptions.fp8_row_taps`; the one-loop and bordered-buffer experiments that
  led to it were bench/check_fp8_conv_rows.py, last at 142b708);
- conv then norm / conv with norm (outputs up to 256): a resblock's first conv and norm2 + SiLU into the next
  conv's float8 staged buffer, as two passes or with the norm in the conv's epilogue (`next_norm`); "float8
  tails" says whether both write a float8 cache entry (`FastForwardOptions.fp8_history`) with act's bytes.
The decode column weighs each shape by its calls per decoder call (the sum is that call's 3x3x3 convs).
"cast ok" says whether the CUDA cast kernel rounds exactly as PyTorch does (bit for bit).

--sweep times every configuration of a small grid per shape instead (minutes per shape: each one compiles),
for ordering `fp8_conv.CONFIGS`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_scaled_mm import timed  # noqa: E402

from infvsr_core.fp8 import fp8_matmul_supported  # noqa: E402
from infvsr_core.kernels import fp8_conv as module  # noqa: E402
from infvsr_core.kernels import split_conv as split  # noqa: E402
from infvsr_core.kernels.norm_silu import rms_norm_rows  # noqa: E402
from infvsr_core.schedule import CHUNK_FRAMES  # noqa: E402
from infvsr_core.vae import SPATIAL_FACTOR, TEMPORAL_FACTOR, WHOLE_CHUNK_PIXELS_FP8  # noqa: E402
from infvsr_core.vae.weights import vae_config_from_state_dict  # noqa: E402

CL3 = torch.channels_last_3d
DEVICE = "cuda"  # the CPU only for a dry run of this script's logic under Triton's interpreter
# Output widths cuDNN computes with zero kernels appended, as the product does (fast_blocks.PADDED_OUT).
PADDED = {96: 128}
# (output height, width) of one decoder call's frame or tile, whether the call takes a whole chunk, and the frames
# per piece of its full-resolution stage (StreamingVAE._plan with resident histories: untiled whole-chunk calls
# keep diffusers' 4 frames there).
_WHOLE_720P = 720 * 1280 <= WHOLE_CHUNK_PIXELS_FP8
SIZES = {
    "720p": (720, 1280, _WHOLE_720P, TEMPORAL_FACTOR if _WHOLE_720P else None),
    "1080p": (1024, 1024, True, None),  # a 128-latent tile; tiles run whole-chunk calls unless the policy is lean
}


def decoder_convs() -> Counter:
    """(in, out, spatial divisor, frame multiplier) -> calls, for the decoder's resblock convs, in its order."""
    from diffusers import AutoencoderKLWan

    meta = {"encoder.conv1.weight": torch.empty(96, 3, 3, 3, 3, device="meta"),
            "conv2.weight": torch.empty(16, 16, 1, 1, 1, device="meta")}  # fmt: skip
    with torch.device("meta"):
        decoder = AutoencoderKLWan(**vae_config_from_state_dict(meta)).decoder
    shapes: Counter = Counter()
    divisor, frames = SPATIAL_FACTOR, 1

    def resblocks(blocks) -> None:
        for block in blocks:
            for conv in (block.conv1, block.conv2):
                assert conv.kernel_size == (3, 3, 3)
                shapes[(conv.in_channels, conv.out_channels, divisor, frames)] += 1

    resblocks(decoder.mid_block.resnets)
    for block in decoder.up_blocks:
        resblocks(block.resnets)
        if block.upsamplers is not None:
            divisor //= 2
            frames *= 2 if block.upsamplers[0].mode == "upsample3d" else 1
    return shapes


def staged_norm_output(c: int, frames: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 staged buffer of SiLU(RMS norm(x) x gamma), gamma), one frame at a time (bounded temporaries)."""
    gamma = 1.0 + 0.1 * torch.randn(c, device=DEVICE, generator=gen)
    buf = torch.empty(1, c, frames, h, w, device=DEVICE, dtype=torch.bfloat16, memory_format=CL3)
    for f in range(frames):
        x = torch.randn(1, c, h, w, device=DEVICE, generator=gen)
        y = F.normalize(x, dim=1) * c**0.5 * gamma.view(1, -1, 1, 1)
        buf[:, :, f].copy_(F.silu(y))
    return buf, gamma


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((got.float() - ref).norm() / ref.norm()).item(), 5)


def sweep_configs(cin: int, cout: int) -> list[module.Config]:
    """Output plans (all outputs as two products or in groups, or one padded power of two) x pixel blocks (128, or
    256 on 8 warps) x depths as the kernel takes them (`block_depth`: 96 channels also as one padded 128 block)
    x stages."""
    padded = (min(256, 1 << (cout - 1).bit_length()), 0)
    plans = {module._cover(cout) if sum(module._cover(cout)) <= 256 else module._cover(module._group_width(cout, 2)),
             padded}  # fmt: skip
    depths = sorted({module.block_depth(cin, d) for d in (32, 64, 128)})
    return [
        module.Config(bm, n1, n2, bk, stages, 4 if bm <= 128 else 8)
        for (n1, n2), bm, bk, stages in itertools.product(sorted(plans), (128, 256), depths, (3, 4))
    ]


def run_shape(label: str, cin: int, cout: int, t: int, h: int, w: int, sweep: bool) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    buf, gamma = staged_norm_output(cin, t + 2, h, w, gen)
    weight = (torch.randn(cout, cin, 3, 3, 3, device=DEVICE, generator=gen) / (27 * cin) ** 0.5).to(torch.bfloat16)
    weight = weight.contiguous(memory_format=CL3)
    bias = 0.05 * torch.randn(cout, device=DEVICE, generator=gen)
    torch.backends.cudnn.benchmark = False  # the float32 reference: no search over slow float32 algorithms
    ref = F.conv3d(buf.float(), weight.float(), bias, padding=(0, 1, 1))
    torch.backends.cudnn.benchmark = True
    row: dict = {"shape": label, "cin": cin, "cout": cout, "frames": t, "h": h, "w": w}

    wide = PADDED.get(cout, cout)
    padded = weight.new_zeros((wide, cin, 3, 3, 3)).contiguous(memory_format=CL3)
    padded[:cout] = weight
    cudnn = partial(F.conv3d, buf, padded, None, padding=(0, 1, 1))
    row["err_bf16"] = rel_error(cudnn()[:, :cout] + bias.view(1, -1, 1, 1, 1), ref)
    row["cudnn_ms"] = timed(cudnn)
    conv = torch.nn.Conv3d(cin, cout, 3, device="meta", dtype=buf.dtype)  # only its attributes are read
    conv._padding = (1, 1, 1, 1, 2, 0)
    if split.split_conv_usable(conv, buf):
        run = partial(split.split_conv, buf, split.pack_split(weight), bias)
        if run() is not None:
            row["split_ms"] = timed(run)

    static_scale = module.static_activation_scale(gamma, cin)
    buf8, _ = module.quantize_staged(buf, static_scale)
    exact, _ = module.quantize_staged(buf, static_scale, use_triton=False)
    row["cast_ok"] = torch.equal(buf8.view(torch.uint8), exact.view(torch.uint8))
    del exact
    packed, w_scale = module.pack_fp8_conv_weight(weight)
    out8 = torch.empty(1, cout, t, h, w, device=DEVICE, dtype=torch.bfloat16, memory_format=CL3)
    static = partial(module.fp8_conv, buf8, static_scale, packed, w_scale, bias, out=out8)

    def dynamic():
        return module.fp8_conv(*module.quantize_staged(buf), packed, w_scale, bias, out=out8)

    if sweep:
        row["sweep"] = {}
        for config in sweep_configs(cin, cout):
            module.CONFIGS[cout], module._chosen = (config,), {}
            try:
                ok = static() is not None
                row["sweep"][str(tuple(config))] = timed(static) if ok else module._failures[-1][:160]
            except Exception as error:  # noqa: BLE001 - report and go on
                row["sweep"][str(tuple(config))] = f"{type(error).__name__}: {str(error)[:160]}"
            print(f"   {tuple(config)}: {row['sweep'][str(tuple(config))]}", flush=True)
        module.CONFIGS.pop(cout)
        module._chosen = {}
    if static() is None:
        row["fp8"] = "no configuration ran: " + " | ".join(module._failures[-4:])
        return row
    row["config"] = tuple(module.configs_for(cout)[module._chosen[(buf8.device, cin, cout, min(w & -w, 256))]])
    row["err_fp8_static"] = rel_error(out8, ref)
    dynamic()
    row["err_fp8_dynamic"] = rel_error(out8, ref)
    row["quantize_ms"] = timed(partial(module.quantize_staged, buf))
    row["fp8_dynamic_ms"] = timed(dynamic)
    row["fp8_static_ms"] = timed(static)
    row["fp8_static_tma_ms"] = timed(partial(static, tma_out=True))
    if module.row_taps_fit(cin):  # the row form (FastForwardOptions.fp8_row_taps) against the padded taps
        padded_taps = out8.float()  # the last call's output
        rows = partial(static, row_packed=module.pack_fp8_row_weight(weight))
        rows()
        row["rows_diff"] = round(((out8.float() - padded_taps).abs().max() / padded_taps.abs().max()).item(), 6)
        row["fp8_static_rows_ms"] = timed(rows)
    if module.holds_pixel(cout) and t >= 2:
        row.update(next_norm(buf8, static_scale, packed, w_scale, bias, gen))
    return row


def next_norm(buf8, x_scale, packed, w_scale, bias, gen: torch.Generator) -> dict:
    """A resblock's first conv followed by norm2 + SiLU into conv2's float8 staged buffer: the conv, then the
    norm's pass (round 18's product), against the conv with the norm in its epilogue (`fp8_conv`'s `gamma`):
    milliseconds, and how many of the staged float8 values differ (float32 sums in another
    order, and the separate pass reads the conv's output rounded to bf16; the largest difference against the
    largest value)."""
    _, _, frames, h, w = buf8.shape
    cout, t = packed.shape[0], frames - 2
    gamma = 1.0 + 0.1 * torch.randn(cout, device=DEVICE, generator=gen)
    act_scale = module.static_activation_scale(gamma, cout)
    staged = torch.empty(1, cout, t + 2, h, w, device=DEVICE, dtype=module.FP8_DTYPE, memory_format=CL3)
    act, tail = staged[:, :, 2:], torch.empty(1, cout, 2, h, w, device=DEVICE, dtype=torch.bfloat16, memory_format=CL3)
    y = torch.empty(1, cout, t, h, w, device=DEVICE, dtype=torch.bfloat16, memory_format=CL3)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 4, 1).view(-1, cout)

    def separate():
        module.fp8_conv(buf8, x_scale, packed, w_scale, None, out=y)
        rms_norm_rows(rows(y), gamma, cout**0.5, silu=True, out=rows(act), pre_bias=bias, tail=rows(tail),
                      out_scale=act_scale)  # fmt: skip

    fused = partial(module.fp8_conv, buf8, x_scale, packed, w_scale, bias, gamma=gamma * cout**0.5, act=act,
                    act_scale=act_scale, tail=tail)  # fmt: skip
    separate()
    want, want_tail = act.float(), tail.float()
    fused()
    got = act.float()
    # A float8 cache entry (`FastForwardOptions.fp8_history`) takes act's last 2 frames' bytes, in either path.
    tail8 = torch.empty_like(tail, dtype=module.FP8_DTYPE, memory_format=CL3)
    module.fp8_conv(buf8, x_scale, packed, w_scale, bias, gamma=gamma * cout**0.5, act=act, act_scale=act_scale,
                    tail=tail8)  # fmt: skip
    last = act[:, :, t - 2 :].contiguous(memory_format=CL3).view(torch.uint8)
    epilogue_ok = torch.equal(tail8.view(torch.uint8), last)
    tail8.zero_()
    module.fp8_conv(buf8, x_scale, packed, w_scale, None, out=y)
    rms_norm_rows(rows(y), gamma, cout**0.5, silu=True, out=rows(act), pre_bias=bias, tail=rows(tail8),
                  out_scale=act_scale)  # fmt: skip
    last = act[:, :, t - 2 :].contiguous(memory_format=CL3).view(torch.uint8)
    return {
        "fp8_tail_ok": epilogue_ok and torch.equal(tail8.view(torch.uint8), last),
        "conv_then_norm_ms": timed(separate),
        "conv_with_norm_ms": timed(fused),
        "conv_with_norm_elem_ms": timed(partial(fused, tma_out=False)),  # the product's is the copy engine's, above
        "norm_codes_differ": round((got != want).float().mean().item(), 6),
        "norm_act_max_diff": round(((got - want).abs().max() / want.abs().max()).item(), 6),
        "norm_tail_rel": rel_error(tail, want_tail),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into the printed list (default: all)")
    parser.add_argument("--sweep", action="store_true", help="time a grid of block configurations per shape")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_fp8_conv: needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or later)")
    device = torch.device("cuda")
    if not fp8_matmul_supported(device):
        sys.exit(f"check_fp8_conv: {torch.cuda.get_device_name(device)} has no float8 tensor cores (sm89+)")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    convs = decoder_convs()
    shapes = []
    for size in args.sizes:
        height, width, whole, pieces = SIZES[size]
        latents = CHUNK_FRAMES // TEMPORAL_FACTOR if whole else 1
        for (cin, cout, divisor, frames), calls in convs.items():
            h, w = height // divisor, width // divisor
            frames *= latents
            if divisor == 1 and pieces and frames > pieces:  # the full-resolution stage, a piece at a time
                calls, frames = calls * (frames // pieces), pieces
            label = f"{size} {cin}->{cout} @ {h}x{w}, {frames} frames"
            shapes.append((size, calls, label, cin, cout, frames, h, w))
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    print("shape | calls | cudnn bf16 ms | split bf16 ms | quantize ms | fp8 dynamic ms | fp8 static ms | "
          "static speedup vs cudnn | err bf16 / fp8 dynamic / fp8 static | cast ok | config", flush=True)  # fmt: skip
    rows, totals = [], Counter()
    for index, (size, calls, label, cin, cout, t, h, w) in enumerate(shapes):
        if args.shapes and index not in args.shapes:
            continue
        row = run_shape(f"[{index}] {label}", cin, cout, t, h, w, args.sweep)
        row["size"], row["calls"] = size, calls
        rows.append(row)
        speedup = row["cudnn_ms"] / row["fp8_static_ms"] if "fp8_static_ms" in row else float("nan")
        print(f"{row['shape']} | {calls} | {row['cudnn_ms']:.3f} | {row.get('split_ms', '-')} | "
              f"{row.get('quantize_ms', '-')} | {row.get('fp8_dynamic_ms', '-')} | {row.get('fp8_static_ms', '-')} | "
              f"{speedup:.2f}x | {row['err_bf16']} / {row.get('err_fp8_dynamic', '-')} / "
              f"{row.get('err_fp8_static', '-')} | {row.get('cast_ok', '-')} | {row.get('config', row.get('fp8'))}",
              flush=True)  # fmt: skip
        if "fp8_static_tma_ms" in row:
            print(f"   fp8 static, copy-engine stores: {row['fp8_static_tma_ms']} ms", flush=True)
        if "fp8_static_rows_ms" in row:
            print(f"   fp8 static, row form: {row['fp8_static_rows_ms']} ms (largest difference from the padded "
                  f"taps {row['rows_diff']} of the output's)", flush=True)  # fmt: skip
        if "conv_with_norm_ms" in row:
            print(f"   next norm: conv then norm {row['conv_then_norm_ms']} ms, conv with norm "
                  f"{row['conv_with_norm_ms']} ms (element stores {row['conv_with_norm_elem_ms']}); codes differ "
                  f"{row['norm_codes_differ']} (largest {row['norm_act_max_diff']}), tail {row['norm_tail_rel']}; "
                  f"float8 tails = act's last frames: {row['fp8_tail_ok']}",
                  flush=True)  # fmt: skip
        bf16 = row.get("split_ms", row["cudnn_ms"])
        for name, ms in (("bf16", min(bf16, row["cudnn_ms"])), ("fp8_static", row.get("fp8_static_ms")),
                         ("fp8_dynamic", row.get("fp8_dynamic_ms"))):  # fmt: skip
            if ms is not None:
                totals[f"{size} {name}"] += calls * ms
        torch.cuda.empty_cache()
    for key, ms in totals.items():
        print(f"decode call, these convs: {key} {ms:.2f} ms", flush=True)
    line = json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "rows": rows, "decode_ms": {k: round(v, 3) for k, v in totals.items()}})  # fmt: skip
    print(line, flush=True)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
