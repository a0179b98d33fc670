"""Would running two stages of neighbouring chunks at once (on two CUDA streams) beat running them in turn?

    python bench/check_overlap.py --size 720p

A chunk's encode, DiT and decode depend on each other, but the decode of
chunk n and the encode of chunk n+1 do not (nor the DiT of chunk n+1 and the
decode of chunk n): a pipeline delayed by one chunk could overlap them. This
measures, on steady full-size stages of independent histories, the wall time
of each pair run one after the other on one stream and side by side on two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SIZES, random_pipeline, synthetic_clip  # noqa: E402

from infvsr_core.schedule import prepare_chunk  # noqa: E402


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda")
    pipe = random_pipeline(device, torch.bfloat16)
    height, width = SIZES[args.size]
    clip = synthetic_clip(9 + 12, height, width, device)
    first, _ = prepare_chunk(clip[:9], 4, True, device=device, dtype=pipe.dtype)
    video, _ = prepare_chunk(clip[9:21], 4, False, device=device, dtype=pipe.dtype)
    prompt = pipe.extract_prompt(clip[0])
    enc_history, dec_history = pipe.vae.new_history(), pipe.vae.new_history()
    pipe.vae.encode_chunk(first, enc_history)
    latents_first = pipe.vae.encode_chunk(first, dec_history)
    pipe.vae.decode_chunk(latents_first, dec_history)
    latents = pipe.vae.encode_chunk(video, enc_history)
    _, cache = pipe.dit_step(latents_first, prompt, 0, None)
    state = {"cache": cache}

    def encode():
        pipe.vae.encode_chunk(video, enc_history)

    def decode():
        pipe.vae.decode_chunk(latents, dec_history)

    def dit():
        _, state["cache"] = pipe.dit_step(latents, prompt, 3, state["cache"])

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def wall(fn) -> float:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - begin)

    def side_by_side(a, b):
        def run():
            here = torch.cuda.current_stream()
            for stream, fn in zip(streams, (a, b), strict=True):
                stream.wait_stream(here)
                with torch.cuda.stream(stream):
                    fn()
            for stream in streams:
                here.wait_stream(stream)

        return run

    for _ in range(2):  # warm: compile, cuDNN search, allocator
        encode(), decode(), dit()
        side_by_side(encode, decode)()
        side_by_side(dit, decode)()
    print(f"{args.size}, {torch.cuda.get_device_name()}")
    for label, fn in (("encode", encode), ("decode", decode), ("dit", dit)):
        print(f"   {label}: " + " / ".join(f"{wall(fn):.1f}" for _ in range(args.reps)) + " ms")
    for label, (a, b) in (("encode + decode", (encode, decode)), ("dit + decode", (dit, decode))):
        try:
            serial = [wall(lambda a=a, b=b: (a(), b())) for _ in range(args.reps)]
            both = [wall(side_by_side(a, b)) for _ in range(args.reps)]
        except torch.OutOfMemoryError:  # two stages' activations at once, and each stream's cached blocks
            print(f"   {label}: out of memory side by side")
            torch.cuda.empty_cache()
            continue
        s, p = min(serial), min(both)
        print(f"   {label}: in turn {s:.1f} ms, side by side {p:.1f} ms ({100 * (s - p) / s:+.1f} %)")
    print(f"   peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
