"""torch._scaled_mm against bf16 F.linear on the DiT's product shapes (issue 21): row-wise vs tensor-wise
scales, with and without bias, exact vs fast accumulation. One JSON line per shape, milliseconds per call.

    python3 bench/check_scaled_mm.py
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(24480, 1536, 8960), (24480, 8960, 1536), (24480, 1536, 1536), (10800, 1536, 1536), (10800, 1536, 8960)]


def timed(fn, repeats: int = 3, calls: int = 20) -> float:
    """Milliseconds per call: the median over `repeats` runs of `calls` back-to-back calls, after one warm run
    (the GPU stays queued, so Python's launch time overlaps, as inside the DiT's CUDA graph it is absent)."""
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return round(statistics.median(times[1:]), 4)


def gpu_ms(fn, calls: int = 20) -> float:
    """Milliseconds of GPU kernel time per call, from the profiler's device events (after one warm call): what
    the call costs inside the DiT's CUDA graph, where no launch time separates kernels. `timed` measures
    wall time between events, which for calls shorter than their Python launch is the launch's time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(event.self_device_time_total for event in prof.key_averages())
    return round(total_us / calls / 1000, 4)


def append_rows(path: Path | None, device: torch.device | str, rows: list[dict]) -> None:
    """One JSON line {device, torch, rows} appended to `path` when given (the checks' --json)."""
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}) + "\n")


def main() -> None:
    device = "cuda"
    for m, k, n in SHAPES:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, device=device, dtype=torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        rows, cols = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
        one = torch.ones((), device=device)
        result: dict[str, object] = {"shape": f"{m}x{k}x{n}", "bf16": timed(partial(F.linear, a, w, b))}
        for fast in (False, True):
            scaled = partial(torch._scaled_mm, a8, w8.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)
            result[f"row_bias_fast{int(fast)}"] = timed(partial(scaled, scale_a=rows, scale_b=cols, bias=b))
            result[f"row_nobias_fast{int(fast)}"] = timed(partial(scaled, scale_a=rows, scale_b=cols))
            result[f"tensor_fast{int(fast)}"] = timed(partial(scaled, scale_a=one, scale_b=one, bias=b))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
