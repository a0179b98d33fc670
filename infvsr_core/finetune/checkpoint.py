"""Checkpoints: the trained weights as safetensors with their configuration, and the state to resume from.

For `--output NAME.safetensors`:

- `NAME.safetensors`: the LoRA (format of `infvsr_core/lora.py`: pairs, rank, alpha, targets) or, with `--full`,
  the whole DiT under the published key names (loadable as `InfVSR.safetensors`); the metadata also holds the
  step and the training configuration (JSON).
- `NAME.state.pt`: what resuming needs besides the weights: the step, the optimizer's state, the random generators'
  states (every rank's), the loss history, the configuration, and in stage 2 the fake score's adapters and
  optimizer. A plain dict of tensors, numbers and strings, read back with `torch.load(weights_only=True)`.
- `NAME.loss.png`: the loss curve.

Each file is written under a temporary name of its own (`io/outputs.py`'s naming, so a killed run's leftovers are
found and removed) and renamed into place when complete; the state file goes first, and both carry the step, so
a pair cut apart by a kill between the two renames is reported instead of resumed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..io.outputs import new_token, remove_stale_temps

STATE_VERSION = 1


def state_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.state.pt")


def plot_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.loss.png")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temp)` to a temporary name beside `path`, flushed to disk, then renamed over `path`."""
    remove_stale_temps(path)
    temp = path.with_name(f".{path.stem}.{new_token()}.partial{path.suffix}")
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    output: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str], state: dict[str, Any]
) -> None:
    """The state file, then the weights (both carry `state["step"]`)."""
    from safetensors.torch import save_file

    step = int(state["step"])
    atomic_write(state_path(output), lambda p: torch.save({**state, "version": STATE_VERSION}, p))
    meta = {**metadata, "step": str(step)}
    atomic_write(output, lambda p: save_file(weights, str(p), metadata=meta))


def load_state(output: Path) -> dict[str, Any]:
    """The resume state of `output`, checked against the weights file's step."""
    from safetensors import safe_open

    path = state_path(output)
    if not output.is_file() or not path.is_file():
        missing = output if not output.is_file() else path
        raise UsageError(f"cannot resume: {missing} does not exist (train without --resume to start anew)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unreadable state file is reported the same way)
        raise UsageError(f"cannot resume: {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UsageError(f"cannot resume: {path} is not a fine-tuning state of this version")
    with safe_open(str(output), framework="pt") as handle:
        weights_step = (handle.metadata() or {}).get("step")
    if weights_step != str(state["step"]):
        raise UsageError(
            f"cannot resume: {output} is at step {weights_step} but {path} at step {state['step']} (a run stopped "
            "while saving); start anew, or restore the pair from a copy"
        )
    return state


def config_json(config: object) -> str:
    """A training configuration (nested dataclasses) as canonical JSON, to store and to compare on resume."""
    from dataclasses import asdict

    return json.dumps(asdict(config), sort_keys=True)


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    """The loss per step and its running mean, as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
               for i in range(len(losses))]  # fmt: skip
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        axis.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
        axis.plot(steps, running, color="#135", linewidth=1.6, label=f"mean of {window}")
        if losses and min(losses) > 0 and max(losses) / min(losses) > 20 and all(map(math.isfinite, losses)):
            axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        atomic_write(path, lambda p: figure.savefig(p, format="png"))
    finally:
        plt.close(figure)
