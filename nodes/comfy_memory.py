"""InfVSR's networks as ComfyUI models, so that ComfyUI's model manager makes room for them and can evict them.

Why: ComfyUI frees device memory for a model by unloading the models of its loaded-models list
(`comfy.model_management.current_loaded_models`), and its "Unload Models" (POST /free) unloads that list;
networks it does not know of stay on the GPU whatever it needs. Here each network of a loaded InfVSR model (the
DiT, the VAE, the visual guidance) gets a `ModelPatcher`; before a node's work `ComfyWeights.load` asks ComfyUI
to load them (`load_models_gpu`) with the work's memory estimate, so ComfyUI unloads other models first; when
ComfyUI unloads ours, their weights go to the offload device and the next `load` brings them back. Whatever
was built on the weights' addresses (the DiT's CUDA graphs, the fast VAE's derived weights) is dropped as soon as
the weights move, so it neither holds device memory after an eviction nor reads stale addresses after a reload.

Used by nodes/types.py (`InfVSRModel.active`), and by nodes/routes.py for its report. ComfyUI's modules come
through nodes/comfy.py; outside ComfyUI (`comfy.manages_models()` is False) nothing here runs.

ComfyUI calls used, each present in 0.3.64 and kept by the later versions (Dynamic VRAM included, where a
plain ModelPatcher still loads and unloads this way): `ModelPatcher(model, load_device, offload_device)` and
its `detach` / `partially_unload` (overridden only to be told after they ran), `load_models_gpu(models,
memory_required=..., force_full_load=True)`, `current_loaded_models` (LoadedModel: `.model`, `.device`,
`.model_unload()`), `get_torch_device`, `unet_offload_device`, `soft_empty_cache`. Full loads only: the
networks are plain torch modules, not comfy.ops layers, so a partial ("lowvram") load would leave weights on
the CPU for them to compute with.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from . import comfy
from ._core import InfVSRPipeline, memory, release_derived

log = logging.getLogger("infvsr")


def weights_device(network: torch.nn.Module) -> torch.device:
    """Where a network's weights are (its first parameter's device; the CPU for one without parameters)."""
    first = next(iter(network.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one ("cuda" and "cuda:0" are, for the current device 0)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _placement(network: torch.nn.Module) -> tuple[tuple[str, int], ...]:
    """Where every weight of a network lies: any move (ComfyUI's, or anyone's `.to()`) changes it."""
    return tuple((str(t.device), t.data_ptr()) for t in (*network.parameters(), *network.buffers()))


class ManagedNetwork(torch.nn.Module):
    """The model a ModelPatcher holds for one network: the network as its only child.

    Why a wrapper: ComfyUI keeps its bookkeeping as attributes of the patcher's model (`device`,
    `model_loaded_weight_memory`, `model_lowvram`, ...); diffusers' VAE refuses `device` (a read-only
    property) and the core's modules should not carry ComfyUI's state. The class name is what ComfyUI logs
    ("Requested to load InfVSRDiT") and what GET /infvsr/memory lists.
    """

    role = "network"

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.device = weights_device(network)  # ComfyUI's `current_loaded_device()` starts from the truth


class InfVSRDiT(ManagedNetwork):
    role = "dit"


class InfVSRVAE(ManagedNetwork):
    role = "vae"


class InfVSRGuidance(ManagedNetwork):
    role = "guidance"


_WRAPPERS: dict[str, type[ManagedNetwork]] = {cls.role: cls for cls in (InfVSRDiT, InfVSRVAE, InfVSRGuidance)}

_patcher_type: type | None = None


def patcher_type() -> type:
    """ComfyUI's ModelPatcher, telling its owner after ComfyUI unloaded it (made once ComfyUI is importable)."""
    global _patcher_type
    if _patcher_type is None:
        base = comfy.model_patcher.ModelPatcher

        class InfVSRPatcher(base):  # type: ignore[misc, valid-type]
            """A ModelPatcher whose `on_unload` runs after every full or partial unload (eviction).

            `detach(unpatch_all=False)` moves no weight (ComfyUI calls it on a model it is about to load again,
            and from `__del__`): not an unload.
            """

            on_unload: Any = None

            def detach(self, *args: Any, **kwargs: Any) -> Any:
                unpatch_all = kwargs.get("unpatch_all", args[0] if args else True)
                try:
                    return super().detach(*args, **kwargs)
                finally:
                    if unpatch_all:
                        self._unloaded()

            def partially_unload(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().partially_unload(*args, **kwargs)
                finally:
                    self._unloaded()

            def _unloaded(self) -> None:
                callback = self.on_unload
                if callback is None:
                    return
                try:
                    callback()
                except Exception as e:  # noqa: BLE001 - runs inside ComfyUI's memory management: never fail it
                    log.warning("InfVSR: after ComfyUI unloaded %s: %s", type(self.model).__name__, e)

        _patcher_type = InfVSRPatcher
    return _patcher_type


def _unload_callback(owner: ComfyWeights, role: str) -> Any:
    """The patcher's `on_unload`: a weak reference, so that the patcher never keeps its owner alive."""
    ref = weakref.ref(owner)

    def unloaded() -> None:
        weights = ref()
        if weights is not None:
            weights.unloaded(role)

    return unloaded


def offload_device(idle_on_cpu: bool) -> torch.device:
    """Where ComfyUI puts our weights when it unloads them: the CPU for "offload to cpu when idle", else where it
    puts diffusion models (the GPU itself with --highvram, so nothing moves)."""
    if idle_on_cpu:
        return torch.device("cpu")
    return torch.device(comfy.model_management.unet_offload_device())


def working_memory(pipe: InfVSRPipeline, input_size: tuple[int, int] | None, scale: int, new_stream: bool) -> int:
    """Device memory a node's work needs beyond the weights, for `load_models_gpu(memory_required=...)`.

    A new stream's state (the core's estimate, `memory.stream_need`, placed as the offload policy places it)
    plus a chunk's transients. A stream that continues holds its state already: ComfyUI sees it as used.
    `input_size` (height, width) None: unknown (ComfyUI then reserves its minimum).
    """
    if input_size is None or pipe.device.type == "cpu":
        return 0
    height, width = int(input_size[0]) * scale, int(input_size[1]) * scale
    spill = getattr(pipe.vae, "spill", None) is not None
    state = memory.stream_need(pipe, height, width, spill).device if new_stream else 0
    return state + memory.activation_bytes(pipe, height, width)


_ALL: weakref.WeakSet[ComfyWeights] = weakref.WeakSet()


class ComfyWeights:
    """One InfVSR model's networks in ComfyUI's loaded-models list, each under its own ModelPatcher.

    Patchers are made at the first `load` for the networks asked for (the ones the core's offload policy
    leaves on the device: nodes/types.py `InfVSRModel.modules`), and remade when that set changes.
    """

    def __init__(self, pipeline: InfVSRPipeline, load_device: torch.device, offload: torch.device) -> None:
        self.pipeline = pipeline
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload)
        self._patchers: dict[str, Any] = {}
        self._placement: dict[str, tuple[tuple[str, int], ...]] = {}
        self.loads: dict[str, int] = {}
        """Per network: how many times `load` found it outside ComfyUI's list and had it loaded."""
        self.unloads: dict[str, int] = {}
        """Per network: how many times ComfyUI unloaded it (fully or partly)."""
        self._lock = threading.RLock()
        _ALL.add(self)

    def _role(self, network: torch.nn.Module) -> str:
        pipe = self.pipeline
        for role, module in (("dit", pipe.dit), ("vae", pipe.vae.vae), ("guidance", pipe.guidance)):
            if network is module:
                return role
        raise ValueError(f"{type(network).__name__} is not one of this pipeline's networks")

    def _network(self, role: str) -> torch.nn.Module:
        return self._patchers[role].model.network

    def patchers(self, networks: Iterable[torch.nn.Module]) -> list[Any]:
        """The patchers of these networks (made where missing); networks no longer asked for leave ComfyUI's list
        (the core's offload policy moves their weights itself)."""
        with self._lock:
            wanted = {self._role(n): n for n in networks}
            for role in [r for r, p in self._patchers.items() if wanted.get(r) is not p.model.network]:
                patcher = self._patchers.pop(role)
                patcher.on_unload = None
                unload_patchers([patcher])
                self._placement.pop(role, None)
            for role, network in wanted.items():
                if role not in self._patchers:
                    wrapper = _WRAPPERS[role](network)
                    patcher = patcher_type()(wrapper, load_device=self.load_device, offload_device=self.offload_device)
                    patcher.on_unload = _unload_callback(self, role)
                    self._patchers[role] = patcher
                    self._placement[role] = _placement(network)
            return [self._patchers[role] for role in wanted]

    def load(self, networks: Iterable[torch.nn.Module], memory_required: int = 0) -> None:
        """Have ComfyUI load these networks fully on the load device, unloading other models first as needed
        (`memory_required`: the work's memory beyond the weights, `working_memory`)."""
        mm = comfy.model_management
        with self._lock:
            patchers = self.patchers(networks)
            listed = {id(loaded.model) for loaded in list(mm.current_loaded_models)}
            for patcher in patchers:
                if id(patcher) not in listed:
                    role = patcher.model.role
                    self.loads[role] = self.loads.get(role, 0) + 1
            mm.load_models_gpu(patchers, memory_required=max(0, int(memory_required)), force_full_load=True)
            for patcher in patchers:
                network = patcher.model.network
                if any(not _same_device(t.device, self.load_device) for t in network.parameters()):
                    # --novram loads no weight even with force_full_load; our modules compute with all of them.
                    log.warning("InfVSR: ComfyUI left %s's weights off %s: moving them there",
                                type(patcher.model).__name__, self.load_device)
                    network.to(self.load_device)
            for role in self._patchers:
                self._sync(role)

    def follow(self, networks: Iterable[torch.nn.Module]) -> None:
        """After a node: ComfyUI's list follows the networks on the device now, where the work changed the offload
        policy (offload="auto" picks a mode per frame size, a lighter one after running out of memory), whose
        weight moves are the core's own."""
        networks = list(networks)
        with self._lock:
            if set(self.loaded_roles()) == {self._role(n) for n in networks}:
                return
            try:
                self.load(networks)
            except Exception as e:  # noqa: BLE001 - bookkeeping after the work: never replaces the work's outcome
                log.warning("InfVSR: updating ComfyUI's loaded models after a change of offload mode: %s", e)

    def unload(self) -> int:
        """Take our networks out of ComfyUI's list, their weights to the offload device (the loader's "offload to
        cpu when idle", after each node); the number unloaded."""
        with self._lock:
            return unload_patchers(list(self._patchers.values()))

    def unloaded(self, role: str) -> None:
        """Called by a patcher after ComfyUI unloaded it (all or part of its weights may have moved)."""
        with self._lock:
            self.unloads[role] = self.unloads.get(role, 0) + 1
            if role in self._patchers:
                self._sync(role)

    def _sync(self, role: str) -> None:
        """Drop what was built on the weights' old addresses when a network's weights moved."""
        now = _placement(self._network(role))
        if self._placement.get(role) == now:
            return
        self._placement[role] = now
        if role == "dit":
            self.pipeline.release_graphs()  # the captured graphs read the weights where they were
        elif role == "vae":
            release_derived(self.pipeline.vae.vae)  # plain attributes: they stay on the device otherwise

    def loaded_roles(self) -> list[str]:
        """The networks in ComfyUI's loaded-models list now."""
        listed = {id(loaded.model) for loaded in list(comfy.model_management.current_loaded_models)}
        return [role for role, patcher in self._patchers.items() if id(patcher) in listed]

    def report(self) -> dict[str, Any]:
        """What GET /infvsr/memory shows for this model."""
        listed = set(self.loaded_roles())
        networks = []
        for role, patcher in list(self._patchers.items()):
            networks.append({
                "role": role,
                "class": type(patcher.model).__name__,
                "loaded": role in listed,
                "weights_device": str(weights_device(patcher.model.network)),
                "bytes": int(patcher.model_size()),
                "loads": self.loads.get(role, 0),
                "unloads": self.unloads.get(role, 0),
            })
        return {
            "model_id": self.pipeline.model_id,
            "load_device": str(self.load_device),
            "offload_device": str(self.offload_device),
            "networks": networks,
        }


def unload_patchers(patchers: Iterable[Any]) -> int:
    """Unload these patchers from ComfyUI's loaded-models list, as its own eviction does (`LoadedModel.model_unload`:
    the weights to the patcher's offload device); the number unloaded."""
    mm = comfy.model_management
    targets = {id(p) for p in patchers}
    unloaded = 0
    models = mm.current_loaded_models
    for i in range(len(models) - 1, -1, -1):
        if id(models[i].model) in targets and models[i].model_unload():
            models.pop(i)
            unloaded += 1
    if unloaded:
        mm.soft_empty_cache()
    return unloaded


def memory_report() -> dict[str, Any]:
    """ComfyUI's loaded models and where each InfVSR model's networks are (GET /infvsr/memory)."""
    if not comfy.manages_models():
        return {"managed": False, "device": str(comfy.compute_device()), "loaded": [], "models": []}
    mm = comfy.model_management
    ours = {id(p) for weights in list(_ALL) for p in list(weights._patchers.values())}
    loaded = []
    for entry in list(mm.current_loaded_models):
        patcher = entry.model
        if patcher is None:
            continue
        loaded.append({
            "class": type(patcher.model).__name__,
            "device": str(entry.device),
            "loaded_bytes": int(patcher.loaded_size()),
            "bytes": int(patcher.model_size()),
            "infvsr": id(patcher) in ours,
        })
    return {
        "managed": True,
        "device": str(mm.get_torch_device()),
        "loaded": loaded,
        "models": [weights.report() for weights in list(_ALL)],
    }
