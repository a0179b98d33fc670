"""The Triton kernels themselves, on the CPU: the kernel tests and the fast VAE's comparisons with diffusers run
again in a subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported), where
every kernel launch runs on CPU tensors through NumPy. Without it the CPU runs would only check the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import triton  # noqa: F401  (a test dependency: requirements-dev.txt)

ROOT = Path(__file__).resolve().parents[1]
# The fast VAE's tests that go through every kernel (norm, bias, RGB in/out, interleave); the slower ones repeat
# the same kernels on more calls.
SELECTED = [
    "tests/test_kernels.py",
    "tests/test_fast_vae.py::test_encoder_and_decoder_match_diffusers_call_by_call",
    "tests/test_fast_vae.py::test_subpixel_upsampler_matches_nearest_then_conv",
    "tests/test_fast_vae.py::test_upsample_layer_matches_diffusers",
    "tests/test_fast_vae.py::test_split_conv_resblocks_match_diffusers",
    "tests/test_fast_vae.py::test_fp8_convs_match_float_convs_on_float8_operands",
    "tests/test_fast_vae.py::test_fp8_row_taps_match_the_padded_taps",
    "tests/test_fast_vae.py::test_fp8_staged_conv_without_a_running_kernel_falls_back_to_the_float_path",
    "tests/test_fast_vae.py::test_fp8_history_holds_the_float8_values_of_the_wide_history",
]


def test_kernels_and_fast_vae_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTED]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
