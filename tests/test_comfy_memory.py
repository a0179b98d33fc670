"""nodes/comfy_memory.py against ComfyUI's real model manager, in a process that imports ComfyUI's `comfy` package.

What the server test (test_comfy_integration.py) cannot reach through HTTP: a partial unload (ComfyUI's eviction
when another model needs less than all of ours), the invalidation of what was built on the weights' addresses
when they move, and the core's offload policy taking a network out of ComfyUI's hands (or back). ComfyUI runs with --cpu
here, so a move to other addresses is made by hand (as a reload to the GPU would place the weights elsewhere).

Runs only when `COMFYUI_DIR` names a ComfyUI checkout; `COMFYUI_PYTHON` is the interpreter with its
requirements and this pack's (default: this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "comfy" / "model_patcher.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout to run ComfyUI's model manager in-process",
)

SCRIPT = r'''
import json, sys
root, comfyui, models = sys.argv[1:4]
sys.path.insert(0, root)
sys.path.append(comfyui)  # after the repository: ComfyUI's own nodes.py must not shadow the pack's nodes/
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

import nodes
from infvsr_core.vae import fast_blocks
from nodes import comfy, comfy_memory


def make_clip(frames, height, width, seed):
    return torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))


result = {}
comfy.register_model_folder()
import folder_paths  # ComfyUI's, as in the server

folder_paths.add_model_folder_path(comfy.MODEL_FOLDER, models, is_default=True)
(model,) = nodes.LoadInfVSRModel().load("InfVSR.ckpt", "Wan2.1_VAE.pth", "ram_swin_large_14m.pth", "DAPE.pth",
                                         dtype="fp32")
pipe, weights = model.pipeline, model._comfy
result["managed"] = comfy.manages_models() and weights is not None
guidance = nodes.ExtractDAPEGuidance().extract(model, make_clip(1, 16, 24, seed=7))["result"][0]
result["listed"] = sorted(weights.loaded_roles())

# A move to other addresses (a reload after an eviction): graphs and derived weights are dropped at the next node.
released = []
pipe.release_graphs = lambda: released.append(True)
conv = next(m for m in pipe.vae.vae.modules() if isinstance(m, WanCausalConv3d))
fast_blocks._padded(conv, None, conv.weight.shape[0] + 8)
result["derived_built"] = "_infvsr_padded" in conv.__dict__
for network in (pipe.dit, pipe.vae.vae):
    network._apply(lambda t: t.clone())
with model.active((16, 24), 4):
    pass
result["graphs_released"] = bool(released)
result["derived_dropped"] = "_infvsr_padded" not in conv.__dict__

# ComfyUI's eviction for a model that needs less than the DiT: a partial unload; the next node loads it fully.
dit = next(entry for entry in mm.current_loaded_models if entry.model is weights._patchers["dit"])
result["partial_kept_listed"] = dit.model_unload(memory_to_free=1) is False
result["partial_loaded"] = [dit.model.loaded_size(), dit.model.model_size()]
result["partial_unloads"] = weights.unloads.get("dit", 0)
node = nodes.InfVSRChunkUpscale()
clip = make_clip(21, 16, 24, seed=3)
first = node.upscale(model, guidance, clip, 4)["result"][0]
result["reloaded"] = [dit.model.loaded_size(), dit.model.model_size()]

# Unload Models between two nodes of a chain: the chain goes on with the same frames.
out = node.upscale(model, guidance, clip[:9], 4, last_chunk=False)
mm.unload_all_models()
result["after_unload_listed"] = weights.loaded_roles()
again = node.upscale(model, guidance, clip[9:], 4, cache=out["result"][1])["result"][0]
result["chain_identical"] = torch.equal(torch.cat([out["result"][0], again]), first)

# The core's offload policy keeps the DiT and the guidance in host memory with "all": they leave ComfyUI's hands.
pipe.offload = "all"
with model.active((16, 24), 4):
    result["all_listed"] = sorted(weights.loaded_roles())
with model.active((16, 24), 4):
    pipe.offload = "state"  # as offload="auto" may choose in the middle of a node: the list follows after it
result["followed_state"] = sorted(weights.loaded_roles())
with model.active((16, 24), 4):
    pipe.offload = "none"
result["followed_none"] = sorted(weights.loaded_roles())
with model.active((16, 24), 4):
    result["none_listed"] = sorted(weights.loaded_roles())
result["report"] = comfy_memory.memory_report()
print("RESULT " + json.dumps(result))
'''


def test_comfyui_model_manager_in_process(tiny_models):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", SCRIPT, str(ROOT), COMFYUI_DIR, str(tiny_models)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["managed"] and result["listed"] == ["dit", "guidance", "vae"]
    assert result["derived_built"] and result["graphs_released"] and result["derived_dropped"]
    assert result["partial_kept_listed"] and result["partial_unloads"] == 1
    loaded, size = result["partial_loaded"]
    assert 0 <= loaded < size
    assert result["reloaded"][0] == result["reloaded"][1]
    assert result["after_unload_listed"] == [] and result["chain_identical"]
    assert result["all_listed"] == ["vae"] and result["none_listed"] == ["dit", "guidance", "vae"]
    assert result["followed_state"] == ["dit", "vae"] and result["followed_none"] == ["dit", "guidance", "vae"]
    (ours,) = [m for m in result["report"]["models"] if {n["role"] for n in m["networks"]} >= {"vae"}]
    assert all(n["loaded"] and n["weights_device"] == "cpu" for n in ours["networks"])
