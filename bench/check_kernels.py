"""GPU check of the hand-written kernels against their PyTorch references, with timings (run on the device)."""

from __future__ import annotations

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
    print("triton broken:", _TRITON_BROKEN)


if __name__ == "__main__":
    main()
