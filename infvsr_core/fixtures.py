"""Random weights in the exact published formats, for tests and benchmarks.

    python -m infvsr_core.fixtures DIR [--tiny] [--seed N] [--safetensors] [--clip FILE]

writes `InfVSR.ckpt`, `Wan2.1_VAE.pth`, `ram_swin_large_14m.pth` and `DAPE.pth`
into DIR: full size by default (speed and memory do not depend on the values),
or a tiny configuration (DiT dim 256, 2 heads, 2 layers; small VAE and Swin)
that the same loaders accept, for CPU tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from .dit import DiTConfig, random_dit_state_dict
from .guidance import SwinConfig, random_dape_state_dict, random_ram_state_dict
from .loader import WEIGHT_FILES
from .vae import TINY_VAE_BASE_DIM, random_vae_state_dict


def write_fixtures(folder: str | os.PathLike, *, tiny: bool = False, seed: int = 0, safetensors: bool = False) -> dict:
    """Write the four files into `folder`; returns {role: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dit_config = DiTConfig.tiny() if tiny else DiTConfig.full()
    swin_config = SwinConfig.tiny() if tiny else SwinConfig.full()
    states = {
        "dit": random_dit_state_dict(dit_config, seed=seed),
        "vae": random_vae_state_dict(base_dim=TINY_VAE_BASE_DIM if tiny else 96, seed=seed + 1),
        "ram": random_ram_state_dict(swin_config, seed=seed + 2),
        "dape": random_dape_state_dict(swin_config, seed=seed + 3),
    }
    paths = {}
    for role, state in states.items():
        spec = WEIGHT_FILES[role]
        if safetensors:
            path = folder / f"{spec.stem}.safetensors"
            from safetensors.torch import save_file

            _atomic(path, lambda p, s=state: save_file({k: v.contiguous() for k, v in s.items()}, str(p)))
        else:
            path = folder / spec.filename
            payload = {"model": state} if role == "ram" else state
            _atomic(path, lambda p, o=payload: torch.save(o, p))
        paths[role] = path
    return paths


def write_demo_clip(path: str | os.PathLike, frames: int = 30, width: int = 64, height: int = 36) -> Path:
    """A small synthetic moving clip (h264, 24 fps) to try the command line on."""
    from fractions import Fraction

    from .io import VideoWriter

    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None]
    x = torch.arange(width, dtype=torch.float32)[None, None, :]
    shape = (frames, height, width)
    channels = [torch.sin((x + 2 * t) / 5), torch.cos((y - t) / 4), torch.sin((x + y + 3 * t) / 7)]
    video = torch.stack([c.expand(shape) for c in channels], -1) * 0.4 + 0.5
    with VideoWriter(path, Fraction(24), codec="h264", crf=12, overwrite=True) as writer:
        writer.write(video)
    return Path(path)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infvsr_core.fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the four files")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration for CPU tests")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of pickles")
    parser.add_argument("--clip", type=Path, help="also write a small synthetic test clip (mp4) here")
    args = parser.parse_args(argv)
    paths = write_fixtures(args.folder, tiny=args.tiny, seed=args.seed, safetensors=args.safetensors)
    for role, path in paths.items():
        print(f"{role:5s} {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.clip:
        print(f"clip  {write_demo_clip(args.clip)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
