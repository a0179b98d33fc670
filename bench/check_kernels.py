"""GPU check of the hand-written kernels against their PyTorch references, with timings (run on the device)."""

from __future__ import annotations

import copy
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infvsr_core.kernels.norm_silu import _TRITON_BROKEN, rms_norm_rows, rms_norm_rows_reference  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    sections = {
        "norm": norm_check,
        "conv": conv_rates,
        "paired": paired_conv_rates,
        "rgb": rgb_conv_rates,
        "taps": rgb_out_taps_check,
        "split": split_conv_rates,
        "pad": padded_output_rates,
        "few": few_channel_kernels,
        "ffn": ffn_check,
        "mid": mid_attention_check,
    }
    parser.add_argument("--sections", nargs="+", default=list(sections), choices=list(sections))
    for name in parser.parse_args().sections:
        sections[name]()


def _rel_error(a: torch.Tensor, b: torch.Tensor, scale: float) -> str:
    return f"{(a.float() - b).abs().max().item() / scale:.2e}"


def ffn_check() -> None:
    """The DiT's FFN with the GELU in the GEMM's epilogue (dit._ffn_fused_op) against Linear -> GELU(tanh) ->
    Linear: time at the 720p / 1080p token counts, error against a float32 run of the tanh form (and of the
    erf form, which cuBLASLt's epilogue must not be)."""
    import torch.nn.functional as F

    from infvsr_core.dit import _ffn_fused_op

    torch.manual_seed(0)
    ffn = torch.nn.Sequential(
        torch.nn.Linear(1536, 8960), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8960, 1536)
    ).cuda()
    with torch.no_grad():
        ffn[0].weight.mul_(2)  # pre-activations of a few units: GELU's curved part, where the two forms differ
    ref32 = copy.deepcopy(ffn).float()  # Module.float() and .to() convert in place
    ffn = ffn.to(torch.bfloat16)
    print("\n== DiT FFN, GELU in the GEMM epilogue vs Linear -> GELU -> Linear (bf16)")
    for tokens in (10800, 24480):
        x = torch.randn(1, tokens, 1536, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            tanh32 = ref32(x.float())
            erf32 = ref32[2](F.gelu(ref32[0](x.float())))
            fused, plain = _ffn_fused_op(ffn, x), ffn(x)
            fused_ms = timed(lambda x=x: _ffn_fused_op(ffn, x))
            plain_ms = timed(lambda x=x: ffn(x))

        scale = tanh32.abs().max().item()
        print(
            f"   {tokens} tokens: fused {fused_ms:.3f} ms, plain {plain_ms:.3f} ms; max error / max vs float32 tanh:"
            f" fused {_rel_error(fused, tanh32, scale)}, plain {_rel_error(plain, tanh32, scale)}; fused vs float32 erf"
            f" {_rel_error(fused, erf32, scale)}"
        )


def mid_attention_check() -> None:
    """The VAE mid block's attention (head dim 384): the flash-style Triton kernel against the blocked GEMMs at the
    latent sizes of 480p, 720p and a 1080p tile (3 latent frames); error against a float32 run, a few block
    configurations of the kernel."""
    from infvsr_core.kernels import mid_attention as module
    from infvsr_core.vae.fast_blocks import _blocked_attention

    torch.manual_seed(0)
    print("\n== VAE mid attention (3 frames, head dim 384): kernel vs blocked GEMMs (bf16)")
    default = module.CONFIGS
    scale = 384**-0.5
    for label, tokens in (("480p", 60 * 104), ("720p", 90 * 160), ("1080p tile", 128 * 128)):
        qkv = torch.randn(3, tokens, 3 * 384, device="cuda", dtype=torch.bfloat16)
        ref = _blocked_attention(*qkv.float().chunk(3, -1), scale)
        peak = ref.abs().max().item()
        blocked = _blocked_attention(*qkv.chunk(3, -1), scale)
        blocked_ms = timed(lambda qkv=qkv: _blocked_attention(*qkv.chunk(3, -1), scale))
        print(f"   {label} ({tokens} tokens): blocked {blocked_ms:.3f} ms, error {_rel_error(blocked, ref, peak)}")
        for config in ((64, 32, 4, 3), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 1), (64, 64, 8, 1),
                       (128, 32, 8, 1), (128, 32, 8, 2), (32, 64, 4, 2)):  # fmt: skip
            module.CONFIGS = {2: (config,)}
            module._chosen.clear()
            out = module.mid_attention(qkv, scale)
            if out is None:
                print(f"   kernel {config}: failed {module._failures[-1][:150]}")
                continue
            ms = timed(lambda qkv=qkv: module.mid_attention(qkv, scale))
            print(f"   kernel (m, n, warps, stages) {config}: {ms:.3f} ms, error {_rel_error(out, ref, peak)}")
        module.CONFIGS = default
        module._chosen.clear()


def few_channel_kernels() -> None:
    """The Triton RGB-in conv and the sub-pixel interleave (kernels/) against float64 references and the cuDNN /
    PyTorch paths they replace (RGB in with 16 padded inputs; 4 strided adds): error, time."""
    import torch.nn.functional as F

    from infvsr_core.kernels.rgb_in import few_in_conv, pack_few_in
    from infvsr_core.kernels.subpixel import interleave, interleave_reference

    torch.backends.cudnn.benchmark = True
    cl3, bf = torch.channels_last_3d, torch.bfloat16
    for h, w in ((720, 1280), (1024, 1024)):
        frames = 12
        rgb = torch.randn(1, 3, frames + 2, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
        w_in = (0.1 * torch.randn(96, 3, 3, 3, 3, device="cuda")).to(bf)
        b_in = torch.randn(96, device="cuda").to(bf)
        ref = F.conv3d(rgb.double(), w_in.double(), b_in.double(), 1, (0, 1, 1))
        got = few_in_conv(rgb, w_in, pack_few_in(w_in), b_in, use_triton=True)
        rgb16 = torch.zeros(1, 16, frames + 2, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
        rgb16[:, :3] = rgb
        w16 = torch.zeros(96, 16, 3, 3, 3, device="cuda", dtype=bf).contiguous(memory_format=cl3)
        w16[:, :3] = w_in
        old = F.conv3d(rgb16, w16, b_in, 1, (0, 1, 1))
        err_new = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        err_old = ((old.double() - ref).abs().max() / ref.abs().max()).item()
        packed = pack_few_in(w_in)
        t_new = timed(lambda: few_in_conv(rgb, w_in, packed, b_in, use_triton=True))  # noqa: B023
        t_old = timed(lambda: F.conv3d(rgb16, w16, b_in, 1, (0, 1, 1)))  # noqa: B023
        print(
            f"rgb in {h}x{w} x{frames}: triton {t_new:.3f} ms (err {err_new:.1e}) vs cuDNN 16-padded "
            f"{t_old:.3f} ms (err {err_old:.1e})"
        )
        # The norm's cache tail and the bias pass into a zero-bordered buffer: the same values as the plain writes.
        from infvsr_core.kernels.norm_silu import bias_add_rows_, rms_norm_rows

        x = torch.randn(frames * h * w, 128, device="cuda", dtype=bf)[:, :96]
        gamma = 1 + 0.1 * torch.randn(96, device="cuda")
        tail = torch.empty(2 * h * w, 96, device="cuda", dtype=bf)
        normed = rms_norm_rows(x, gamma, 96**0.5, silu=True, tail=tail)
        border = torch.zeros(frames, h + 1, w + 1, 96, device="cuda", dtype=bf)
        bias = torch.randn(96, device="cuda")
        bias_add_rows_(x, bias, normed, out=border[:, :h, :w])
        plain = torch.empty(frames * h * w, 96, device="cuda", dtype=bf)
        bias_add_rows_(x, bias, normed, out=plain)
        print(
            f"norm tail {h}x{w}: equal {torch.equal(tail, normed[-2 * h * w :])}; bias into bordered buffer: equal "
            f"{torch.equal(border[:, :h, :w].reshape(-1, 96), plain)}, border zero "
            f"{not border[:, h].any().item() and not border[:, :, w].any().item()}"
        )
        for c, lh, lw in ((96, h // 2, w // 2), (192, h // 4, w // 4)):
            y = torch.randn(frames, lh + 1, lw + 1, 4 * c, device="cuda", dtype=bf)
            bias = torch.randn(c, device="cuda", dtype=bf)
            same = torch.equal(interleave(y, bias, c, use_triton=True), interleave_reference(y, bias, c))
            t_new = timed(lambda: interleave(y, bias, c, use_triton=True))  # noqa: B023
            t_old = timed(lambda: interleave_reference(y, bias, c))  # noqa: B023
            gbps = 2 * y.numel() * 2 / t_new / 1e6
            print(
                f"interleave {c}ch -> {2 * lh}x{2 * lw} x{frames}: triton {t_new:.3f} ms ({gbps:.0f} GB/s), "
                f"4 strided adds {t_old:.3f} ms, bit-equal {same}"
            )


def padded_output_rates() -> None:
    """The VAE's other convs with output counts that fill cuDNN's tiles badly: computed with more outputs?"""
    torch.backends.cudnn.benchmark = True
    cl3, cl2 = torch.channels_last_3d, torch.channels_last
    bf = torch.bfloat16
    # (label, input channels, outputs, padded outputs, frame, kernel): 3D convs see 4 frames + 2 cached.
    cases = [
        ("rgb in", 16, 96, 128, (720, 1280), 3),
        ("res 96 (1080p tile)", 96, 96, 128, (512, 512), 3),
        ("res 192", 192, 192, 256, (360, 640), 3),
        ("res 96->192", 96, 192, 256, (360, 640), 3),
        ("res 384", 384, 384, 512, (180, 320), 3),
        ("res 384 (latent)", 384, 384, 512, (90, 160), 3),
        ("down 96 (stride 2)", 96, 96, 128, (720, 1280), 2),
        ("down 192 (stride 2)", 192, 192, 256, (360, 640), 2),
    ]
    for label, cin, cout, padded, (h, w), kind in cases:
        if kind == 3:
            x = torch.randn(1, cin, 6, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
            flops = 2 * 4 * h * w * cin * 27 * cout
            conv = lambda weight: torch.nn.functional.conv3d(x, weight, None, 1, (0, 1, 1))  # noqa: B023, E731
            shape = (3, 3, 3)
            layout = cl3
        else:
            x = torch.randn(4, cin, h + 1, w + 1, device="cuda", dtype=bf).contiguous(memory_format=cl2)
            flops = 2 * 4 * (h // 2) * (w // 2) * cin * 9 * cout
            conv = lambda weight: torch.nn.functional.conv2d(x, weight, None, 2)  # noqa: B023, E731
            shape = (3, 3)
            layout = cl2
        ms = {}
        for n in (cout, padded):
            weight = torch.randn(n, cin, *shape, device="cuda", dtype=bf).contiguous(memory_format=layout)
            ms[n] = timed(lambda: conv(weight))  # noqa: B023
        print(
            f"{label} {cin}->{cout} {h}x{w} x4: {ms[cout]:.3f} ms ({flops / ms[cout] / 1e9:.0f} TFLOP/s); "
            f"as {padded}: {ms[padded]:.3f} ms ({flops / ms[padded] / 1e9:.0f} useful)"
        )


def split_conv_rates() -> None:
    """96 output channels fill a quarter of cuDNN's tiles with nothing: is 96 -> 64 plus 96 -> 32 faster?"""
    torch.backends.cudnn.benchmark = True
    cl3 = torch.channels_last_3d
    bf = torch.bfloat16
    for h, w in ((480, 832), (720, 1280)):
        x = torch.randn(1, 96, 6, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
        flops = 2 * 4 * h * w * 96 * 27 * 96
        weights = {
            n: torch.randn(n, 96, 3, 3, 3, device="cuda", dtype=bf).contiguous(memory_format=cl3)
            for n in (96, 64, 32, 128)
        }
        ms = {n: timed(lambda: torch.nn.functional.conv3d(x, weights[n], None, 1, (0, 1, 1))) for n in weights}  # noqa: B023
        split = ms[64] + ms[32]
        print(
            f"{h}x{w} x4, 96 in: 96 out {ms[96]:.3f} ms ({flops / ms[96] / 1e9:.0f} TFLOP/s); "
            f"64 out {ms[64]:.3f} + 32 out {ms[32]:.3f} = {split:.3f} ms ({flops / split / 1e9:.0f} useful); "
            f"128 out {ms[128]:.3f} ms ({flops / ms[128] / 1e9:.0f} useful)"
        )


def norm_check() -> None:
    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    print(f"triton {version}, gcc {shutil.which('gcc')}, cc {shutil.which('cc')}, {torch.cuda.get_device_name()}")
    for c, pixels in ((96, 4 * 720 * 1280), (384, 90 * 160)):
        for dtype in (torch.bfloat16, torch.float32):
            rows = torch.randn(pixels, c, device="cuda", dtype=dtype)
            gamma = 1 + 0.1 * torch.randn(c, device="cuda")
            ref = rms_norm_rows_reference(rows, gamma, c**0.5, 0.0, True)
            got = rms_norm_rows(rows, gamma, c**0.5, silu=True)
            err = (got.float() - ref.float()).abs().max().item()
            t_ref = timed(lambda: rms_norm_rows_reference(rows, gamma, c**0.5, 0.0, True))  # noqa: B023
            t_new = timed(lambda: rms_norm_rows(rows, gamma, c**0.5, silu=True))  # noqa: B023
            print(f"norm+silu C={c} rows={pixels} {dtype}: max err {err:.2e}, ref {t_ref:.3f} / fused {t_new:.3f} ms")
    # Channel slices of wider rows (a conv computed with padded outputs), against compact copies.
    from infvsr_core.kernels.norm_silu import bias_add_rows_

    wide = torch.randn(4 * 720 * 1280, 128, device="cuda", dtype=torch.bfloat16)
    rows, gamma = wide[:, :96], 1 + 0.1 * torch.randn(96, device="cuda")
    pre, bias = torch.randn(96, device="cuda"), torch.randn(96, device="cuda")
    same = torch.equal(
        rms_norm_rows(rows, gamma, 96**0.5, silu=True, pre_bias=pre),
        rms_norm_rows(rows.contiguous(), gamma, 96**0.5, silu=True, pre_bias=pre),
    )
    res = torch.randn(rows.shape, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(res)
    bias_add_rows_(rows, bias, res, out=out)
    compact = rows.contiguous()
    bias_add_rows_(compact, bias, res)
    t_slice = timed(lambda: rms_norm_rows(rows, gamma, 96**0.5, silu=True, pre_bias=pre))
    t_compact = timed(lambda: rms_norm_rows(compact, gamma, 96**0.5, silu=True, pre_bias=pre))
    print(
        f"channel slice (96 of 128): norm equal {same}, bias+residual equal {torch.equal(out, compact)}; "
        f"norm {t_slice:.3f} ms vs compact {t_compact:.3f} ms"
    )
    print("triton broken:", _TRITON_BROKEN)


def rgb_conv_rates() -> None:
    """The VAE's RGB-in (3 -> 96) and RGB-out (96 -> 3) causal convs, their few channels zero-padded to P:
    cuDNN's kernel choice (and speed) depends on P; these convs move a lot of memory for little arithmetic."""
    torch.backends.cudnn.benchmark = True
    cl3 = torch.channels_last_3d
    bf = torch.bfloat16
    for h, w in ((480, 832), (720, 1280)):
        for frames in (4, 12):
            big = torch.randn(1, 96, frames + 2, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
            for p in (8, 16, 32, 64):
                weight = torch.randn(p, 96, 3, 3, 3, device="cuda", dtype=bf).contiguous(memory_format=cl3)
                ms = timed(lambda: torch.nn.functional.conv3d(big, weight, None, 1, (0, 1, 1)))  # noqa: B023
                gbps = big.numel() * 2 / ms / 1e6
                print(f"rgb out 96->{p:2d} {h}x{w} x{frames}: {ms:.3f} ms ({gbps:.0f} GB/s of input read)")
            for p in (8, 16, 32):
                small = torch.randn(1, p, frames + 2, h, w, device="cuda", dtype=bf).contiguous(memory_format=cl3)
                weight = torch.randn(96, p, 3, 3, 3, device="cuda", dtype=bf).contiguous(memory_format=cl3)
                ms = timed(lambda: torch.nn.functional.conv3d(small, weight, None, 1, (0, 1, 1)))  # noqa: B023
                gbps = 96 * frames * h * w * 2 / ms / 1e6
                print(f"rgb in {p:2d}->96 {h}x{w} x{frames}: {ms:.3f} ms ({gbps:.0f} GB/s of output written)")


def rgb_out_taps_check() -> None:
    """The RGB head (96 -> 3) as the fast forward runs it: cuDNN with 8 padded outputs, the channel slice and the
    bias pass (the bf16 default), against one product of the 27 taps and one gather (kernels/rgb_out.py:
    `FastForwardOptions.rgb_out_taps`); milliseconds per call and the largest error of each against float32."""
    import torch.nn.functional as F

    from infvsr_core.kernels.rgb_out import few_out_conv, pack_few_out, tap_contributions, tap_sum
    from infvsr_core.vae.fast_blocks import _add_bias

    torch.backends.cudnn.benchmark = True
    cl3 = torch.channels_last_3d
    bf = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(3, 96, 3, 3, 3, device="cuda", generator=gen) / (27 * 96) ** 0.5).to(bf)
    padded = torch.zeros(8, 96, 3, 3, 3, device="cuda", dtype=bf)
    padded[:3] = weight
    padded = padded.contiguous(memory_format=cl3)
    bias = torch.randn(3, device="cuda", generator=gen).to(bf)
    packed = pack_few_out(weight)
    for h, w in ((480, 832), (720, 1280), (1080, 1920)):
        for frames in (4, 12):
            buf = F.silu(torch.randn(1, 96, frames + 2, h, w, device="cuda", dtype=bf, generator=gen))
            buf = buf.contiguous(memory_format=cl3)
            ref = F.conv3d(buf.float(), weight.float(), bias.float(), 1, (0, 1, 1))
            scale = ref.abs().max().item()

            def cudnn(buf=buf):
                return _add_bias(F.conv3d(buf, padded, None, 1, (0, 1, 1))[:, :3], bias)

            def taps(buf=buf):
                return few_out_conv(buf, weight, packed, bias, use_triton=True)

            y = tap_contributions(buf, packed)
            ms = {name: timed(fn) for name, fn in (("cudnn", cudnn), ("taps", taps))}
            product = timed(lambda buf=buf: tap_contributions(buf, packed))
            gather = timed(lambda y=y: tap_sum(y, bias, 3, use_triton=True))
            errors = {name: _rel_error(fn(), ref, scale) for name, fn in (("cudnn", cudnn), ("taps", taps))}
            print(
                f"rgb head 96->3 {h}x{w} x{frames}: cuDNN (8 outputs) {ms['cudnn']:.3f} ms, err {errors['cudnn']}; "
                f"taps {ms['taps']:.3f} ms (product {product:.3f} + gather {gather:.3f}), err {errors['taps']}",
                flush=True,
            )
            del buf, ref, y


def conv_rates() -> None:
    """The VAE's largest convolutions at 720p: frames per call, and the upsampler as 4 sub-pixel phases."""
    torch.backends.cudnn.benchmark = True
    cl3, cl2 = torch.channels_last_3d, torch.channels_last
    for c, h, w in ((96, 720, 1280), (192, 360, 640)):
        weight = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl3)
        for out_frames in (1, 2, 4, 12):
            x = torch.randn(1, c, out_frames + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
                memory_format=cl3
            )
            ms = timed(lambda: torch.nn.functional.conv3d(x, weight, None, 1, (0, 1, 1)))  # noqa: B023
            tflops = 2 * 27 * c * c * h * w * out_frames / ms / 1e9
            print(
                f"conv3d {c}ch {h}x{w}, {out_frames} out frames: {ms:.2f} ms, {tflops:.0f} TFLOP/s, "
                f"{ms / out_frames:.3f} ms/frame"
            )
    # Upsampler: nearest 2x then 3x3 conv (192 -> 96 at 720x1280, 4 frames) vs the same as 4 phases of 2x2.
    x = torch.randn(4, 192, 360, 640, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl2)
    w3 = torch.randn(96, 192, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl2)

    def nearest_conv():
        up = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(4, 360, 2, 640, 2, 192).reshape(4, 720, 1280, 192)
        return torch.nn.functional.conv2d(up.permute(0, 3, 1, 2), w3, None, padding=1)

    w4 = torch.randn(4 * 96, 192, 2, 2, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl2)

    def phases():
        return torch.nn.functional.conv2d(x, w4, None, padding=1)

    print(
        f"upsample 192->96 4x720x1280: nearest+3x3 {timed(nearest_conv):.2f} ms, "
        f"4-phase 2x2 conv (one call, 384 out ch) {timed(phases):.2f} ms"
    )


def paired_conv_rates() -> None:
    """96-channel 3x3x3 conv at 720p: plain vs 2 (or 4) output pixels per position as 2x (4x) the channels.

    Rates count the useful multiply-adds only (the paired kernels carry zero taps).
    """
    import torch.nn.functional as F

    torch.backends.cudnn.benchmark = True
    cl3 = torch.channels_last_3d
    c, t, h, w = 96, 4, 720, 1280
    x = torch.randn(1, c, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl3)
    w3 = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=torch.bfloat16) / (27 * c) ** 0.5
    useful = 2 * 27 * c * c * h * w * t

    def pair(kernel, shift_axis: int, groups: int) -> torch.Tensor:
        out = torch.zeros(groups * c, c, *kernel, device="cuda", dtype=torch.bfloat16)
        for g in range(groups):
            index = [slice(None)] * 5
            index[0] = slice(g * c, (g + 1) * c)
            index[shift_axis] = slice(g, g + 3)
            out[tuple(index)] = w3
        return out.contiguous(memory_format=cl3)

    variants = {
        "plain 96 out": (w3.contiguous(memory_format=cl3), 1, (0, 1, 1)),
        "column pairs 192 out, k(3,3,4) s(1,1,2)": (pair((3, 3, 4), 4, 2), (1, 1, 2), (0, 1, 1)),
        "row pairs 192 out, k(3,4,3) s(1,2,1)": (pair((3, 4, 3), 3, 2), (1, 2, 1), (0, 1, 1)),
        "frame pairs 192 out, k(4,3,3) s(2,1,1)": (pair((4, 3, 3), 2, 2), (2, 1, 1), (0, 1, 1)),
    }
    ref = F.conv3d(x.float(), w3.float(), None, 1, (0, 1, 1))
    for name, (weight, stride, padding) in variants.items():
        ms = timed(lambda: F.conv3d(x, weight, None, stride, padding))  # noqa: B023
        y = F.conv3d(x, weight, None, stride, padding)
        if name.startswith("column"):
            y = torch.stack([y[:, :c], y[:, c:]], dim=-1).flatten(-2)
        elif name.startswith("row"):
            y = torch.stack([y[:, :c], y[:, c:]], dim=-2).flatten(-3, -2)
        elif name.startswith("frame"):
            y = torch.stack([y[:, :c], y[:, c:]], dim=3).flatten(2, 3)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        print(f"conv 96ch {t}x{h}x{w} {name}: {ms:.2f} ms, {useful / ms / 1e9:.0f} useful TFLOP/s, rel err {err:.1e}")


if __name__ == "__main__":
    main()
