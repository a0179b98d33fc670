"""GPU check: cuDNN's own fused conv + bias + residual (its graph API, through the cuDNN frontend's Python
package) against the product's path (cuDNN conv through PyTorch, then the Triton bias + residual pass).

    python bench/check_cudnn_fusion.py      # needs nvidia-cudnn-frontend (not a product dependency)

Why: the memory-bound passes around the VAE's convs are what is left of a
720p chunk beyond the convs, attention and GEMMs (RESULTS round 11-12). If
cuDNN's runtime-fusion engines ran the conv with the bias and residual add in
its epilogue at the plain conv's rate, that would be a reason to take the
frontend as a dependency. Prints, per shape: the product's conv alone, the
product's conv + pass, the graph's conv alone, and the graph's fused conv +
bias + add (every engine configuration the heuristics offer, best kept), with
the fused result's error against a float32 reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cudnn
import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infvsr_core.kernels.norm_silu import bias_add_rows_  # noqa: E402

CL3 = torch.channels_last_3d
BF16, FLOAT = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
# (label, channels, frames out, H, W, outputs the product computes)
SHAPES = [
    ("96 @ 720p, 4 frames", 96, 4, 720, 1280, 128),
    ("192 @ 360x640, 4 frames", 192, 4, 360, 640, 192),
]


def build(handle, x, w, out, bias=None, residual=None):
    """A graph conv(x, w) [+ bias + residual] -> out; returns (graph, {uid tensors}) with every plan built."""
    g = cudnn.pygraph(io_data_type=BF16, intermediate_data_type=FLOAT, compute_data_type=FLOAT, handle=handle)
    tx = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=BF16)
    tw = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=BF16)
    y = g.conv_fprop(image=tx, weight=tw, padding=[0, 1, 1], stride=[1, 1, 1], dilation=[1, 1, 1])
    pack = {tx: x, tw: w}
    if bias is not None:
        tb = g.tensor(name="B", dim=list(bias.shape), stride=list(bias.stride()), data_type=FLOAT)
        tr = g.tensor(name="R", dim=list(residual.shape), stride=list(residual.stride()), data_type=BF16)
        y = g.add(name="res", a=g.bias(name="bias", input=y, bias=tb), b=tr)
        pack.update({tb: bias, tr: residual})
    y.set_output(True).set_data_type(BF16).set_dim(list(out.shape)).set_stride(list(out.stride()))
    pack[y] = out
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g, pack


def best_plan(g, pack, handle) -> tuple[float, int]:
    best = (float("inf"), -1)
    for index in range(g.get_execution_plan_count()):
        try:
            ws = torch.empty(g.get_workspace_size_plan_at_index(index), device="cuda", dtype=torch.uint8)
            ms = do_bench(lambda index=index, ws=ws: g.execute_plan_at_index(pack, ws, index, handle=handle))
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"      plan {index}: {type(error).__name__}: {str(error)[:120]}")
            continue
        best = min(best, (ms, index))
    return best


def main() -> None:
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    print(f"cuDNN backend {cudnn.backend_version_string()}, frontend {cudnn.__version__}")
    for shape in SHAPES:
        check(handle, *shape)


def check(handle, label: str, c: int, t: int, h: int, w: int, wide: int) -> None:
    buf = torch.randn(1, c, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL3)
    weight = (torch.randn(c, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16)
    weight = weight.contiguous(memory_format=CL3)
    bias = torch.randn(c, device="cuda")
    res = torch.randn(1, c, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL3)
    padded = weight.new_zeros((wide, c, 3, 3, 3)).contiguous(memory_format=CL3)
    padded[:c] = weight

    def product():
        y = F.conv3d(buf, padded, None, padding=(0, 1, 1))[:, :c]
        rows = y.permute(0, 2, 3, 4, 1).reshape(-1, wide)[:, :c]
        return bias_add_rows_(rows, bias, res.permute(0, 2, 3, 4, 1).reshape(-1, c))

    flops = 2 * 27 * c * c * t * h * w
    ref = F.conv3d(buf.float(), weight.float(), bias, padding=(0, 1, 1)) + res.float()
    scale = ref.abs().max().item()
    ms_conv = do_bench(lambda: F.conv3d(buf, padded, None, padding=(0, 1, 1)))
    ms_product = do_bench(product)
    print(f"{label}: PyTorch cuDNN conv ({wide} outputs) {ms_conv:.3f} ms ({flops / ms_conv / 1e9:.0f} useful "
          f"TFLOP/s); + Triton bias/residual pass {ms_product:.3f} ms", flush=True)  # fmt: skip
    out = torch.empty(1, c, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL3)
    for name, extra in (("graph conv alone", {}), ("graph conv + bias + residual", {"bias": None})):
        try:
            if extra:
                b5 = bias.view(1, c, 1, 1, 1)
                g, pack = build(handle, buf, weight, out, b5, res)
            else:
                g, pack = build(handle, buf, weight, out)
            ms, index = best_plan(g, pack, handle)
            torch.cuda.synchronize()
            err = ""
            if extra:
                err = f", error {(out.float() - ref).abs().max().item() / scale:.2e}"
            print(f"   {name}: {ms:.3f} ms (plan {index} of {g.get_execution_plan_count()}){err}", flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"   {name}: failed {type(error).__name__}: {str(error)[:300]}", flush=True)


if __name__ == "__main__":
    main()
