"""GPU check: the decoder's full-resolution blocks (3 resblocks + the head's norm) through cuDNN and the fused
Triton convs (bench/triton_conv3.py), values and time.

    python bench/check_resblock.py [--frames 4] [--size 720p]

The cuDNN path is the product's (`fast_vae._resblock`, `_stage`): each conv
then a norm or bias + residual pass. The fused path computes each conv with
the Triton kernel, whose epilogue adds the bias (and residual) and writes
the next conv's staged input (norm + SiLU) and cache entry itself.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock, WanRMS_norm  # noqa: E402
from triton.testing import do_bench  # noqa: E402
from triton_conv3 import conv3, pack_weight  # noqa: E402

from infvsr_core.fast_vae import CL3, _Cursor, _resblock, _stage  # noqa: E402

SIZES = {"480p": (480, 832), "720p": (720, 1280), "1080p-tile": (512, 512)}


def staged(past: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, C, 2 + t, H, W) buffer holding `past` in front, and a new tail entry."""
    b, c, _, h, w = past.shape
    buf = torch.empty((b, c, 2 + t, h, w), dtype=past.dtype, device=past.device, memory_format=CL3)
    buf[:, :, :2].copy_(past)
    return buf, torch.empty((b, c, 2, h, w), dtype=past.dtype, device=past.device, memory_format=CL3)


def fused_chain(blocks, head_norm, packs, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
    """Returns the head conv's staged buffer (what the head conv reads) and the new cache entries."""
    t = x.shape[2]
    new = list(cache)
    buf = _stage(blocks[0].conv1, x, _Cursor(new), blocks[0].norm1)
    for i, block in enumerate(blocks):
        buf2, tail2 = staged(cache[2 * i + 1], t)
        g2 = (block.norm2.gamma.reshape(-1).float() * block.norm2.scale).contiguous()
        conv3(buf, packs[2 * i], 96, block.conv1.bias.float(), out=False, gamma=g2, act=buf2[:, :, 2:], tail=tail2)
        new[2 * i + 1] = tail2
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else head_norm
        buf, tail = staged(cache[2 * i + 2], t)
        g = (nxt.gamma.reshape(-1).float() * nxt.scale).contiguous()
        x = conv3(buf2, packs[2 * i + 1], 96, block.conv2.bias.float(), x, gamma=g, act=buf[:, :, 2:], tail=tail)
        new[2 * i + 2] = tail
    return buf, new


def cudnn_chain(blocks, head_norm, head_conv, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
    new = list(cache)
    cursor = _Cursor(new)
    for block in blocks:
        x = _resblock(block, x, cursor)
    return _stage(head_conv, x, cursor, head_norm), new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--configs", nargs="+", default=["256,4,8"], help="block_m,stages,warps")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    h, w = SIZES[args.size]
    dev, dt = "cuda", torch.bfloat16
    blocks = [WanResidualBlock(96, 96).to(dev, dt).eval() for _ in range(3)]
    head_norm = WanRMS_norm(96, images=False).to(dev, dt)
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    head_conv = WanCausalConv3d(96, 3, 3, padding=1).to(dev, dt)
    with torch.no_grad():
        for block in blocks:
            for norm in (block.norm1, block.norm2):
                norm.gamma.uniform_(0.5, 1.5)
            for conv in (block.conv1, block.conv2):
                conv.weight.data = conv.weight.data.contiguous(memory_format=CL3)
                conv.bias.uniform_(-0.1, 0.1)
        head_norm.gamma.uniform_(0.5, 1.5)
    weights = [c.weight.detach() for b in blocks for c in (b.conv1, b.conv2)]
    x = torch.randn(1, 96, args.frames, h, w, device=dev, dtype=dt).contiguous(memory_format=CL3)
    cache = [torch.randn(1, 96, 2, h, w, device=dev, dtype=dt).contiguous(memory_format=CL3) for _ in range(7)]
    with torch.inference_mode():
        ref, ref_cache = cudnn_chain(blocks, head_norm, head_conv, x, cache)
        scale = ref.float().abs().max().item()
        ms = do_bench(lambda: cudnn_chain(blocks, head_norm, head_conv, x, cache))
        print(f"{args.size}, {args.frames} frames: cuDNN + passes: {ms:.3f} ms", flush=True)
        for config in args.configs:
            bm, st, wp = (int(v) for v in config.split(","))
            conv3.__kwdefaults__.update(block_m=bm, stages=st, warps=wp)
            packs = [pack_weight(w, 128) for w in weights]
            got, got_cache = fused_chain(blocks, head_norm, packs, x, cache)
            err = (got.float() - ref.float()).abs().max().item() / scale
            cache_err = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(got_cache, ref_cache, strict=True)
            )
            ms = do_bench(partial(fused_chain, blocks, head_norm, packs, x, cache))
            print(f"   fused m{bm} s{st} w{wp}: {ms:.3f} ms, "
                  f"error {err:.2e}, caches {cache_err / scale:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
