"""The streaming InfVSR pipeline: one DiT step per chunk between a causal VAE encode and decode.

`InfVSRPipeline` holds the three networks; all per-stream state lives in an
`InfVSRSession`, so one loaded pipeline serves any number of streams and a
stream can be resumed from its session object.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .dit import CausalWanDiT, KVCache
from .errors import UsageError
from .guidance import VisualGuidance
from .memory.host import HostCache, HostMemory, PendingFetch
from .memory.kv import WindowedUpload
from .memory.modules import ModuleOffload
from .memory.plan import choose_mode, plan_spill, use_growable_segments
from .memory.policy import AUTO_MODE, OffloadMode, OffloadPolicy
from .schedule import TIMESTEP, chunk_length, finish_frames, one_step_restore, prepare_chunk
from .session import InfVSRSession, SceneState
from .vae import StreamingVAE, VAEHistory

log = logging.getLogger(__name__)

StageHook = Callable[[str], AbstractContextManager[Any]]
"""`InfVSRPipeline.stage_hook`: given a stage's name, the context its work runs in."""
STAGES: tuple[str, ...] = ("prompt", "prepare", "encode", "dit", "decode", "finish", "output")
"""A chunk's stages in order, by the names `stage_hook` receives ("prompt" only where a reference is taken)."""

FRAME_RANGE: tuple[float, float] = (-0.5, 1.5)
"""Frame values let through; beyond them frames are refused (see `check_frame_values`).

Frames are meant to be in [0, 1], but resampling upstream overshoots near hard
edges (a bicubic resize, ComfyUI's default, takes a plain black/white edge to
about -0.1 and 1.2, fine patterns to -0.45 and 1.45), and refusing that would
refuse ordinary workflows. What lies beyond is no resampled [0, 1] image: 0-255
values or [-1, 1] values, which would otherwise run and give garbage.
"""

FRAMES_EXPECTED = "expected (T, H, W, 3) float frames in [0, 1]"
# offload="auto" can redo this many chunks after each plan (or step down) in a lighter mode. Why not every
# chunk: a size's peak is set by its first chunks (the first without a KV cache, the second with every cache
# full; later chunks repeat the second's shapes), and keeping a chunk redoable keeps its predecessor's cache
# entries alive and stops uploaded histories being overwritten in place, which costs host memory and speed
# (bench/RESULTS.md round 15).
GUARDED_CHUNKS = 3


class InfVSRPipeline:
    """InfVSR inference over the published networks, streamed chunk by chunk.

    `policy` (an `OffloadPolicy`; `offload` is its mode name) says which state
    and weights live in host memory between uses, for less device memory:
    `OffloadPolicy` describes the modes.

    `stage_hook` (None by default) is for measurements (bench/): when set, each
    stage of a chunk (`STAGES`) runs inside `with stage_hook(name):`, so the
    caller can time it (synchronizing the device on entry and exit), profile it
    or read its peak memory, through `push` and the other public calls.
    `output_staging` (True): frames for a CPU `output_device` come back through
    a page-locked block, beside the next chunk's work; False: CUDA's own copy
    (an A/B for measurements).
    """

    def __init__(
        self,
        dit: CausalWanDiT,
        vae: StreamingVAE,
        guidance: VisualGuidance,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        output_device: torch.device | str = "cpu",
        model_id: str | None = None,
        offload: OffloadMode | None = None,
    ) -> None:
        self.dit = dit.eval().requires_grad_(False)
        self.vae = vae
        self.guidance = guidance.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.model_id = model_id or uuid.uuid4().hex
        self.stage_hook: StageHook | None = None
        self.output_staging = True
        self._host_memory = HostMemory()
        self._dit_weights = ModuleOffload(self.dit, self._host_memory)
        self._guidance_weights = ModuleOffload(self.guidance, self._host_memory)
        self.on_plan: Callable[[str], None] = lambda line: log.info("InfVSR memory plan: %s", line)
        """Told each choice of offload="auto" (at a frame size's first chunk, and at every step down)."""
        self._planned_size: tuple[int, int] | None = None
        self._guarded_chunks = 0
        """Chunks left that offload="auto" may still redo in a lighter mode (`GUARDED_CHUNKS`)."""
        self.spill_dir: Path | None = None
        """Where offloaded VAE histories go when host memory cannot hold them (`memory.plan.plan_spill`); None:
        the system's temporary folder (TMPDIR). An explicit cap (`vae.set_spill`) takes precedence."""
        # None: as the VAE was built (its history_device), nothing else offloaded.
        self.offload = offload or ("none" if vae.history_device is None else "histories")

    # -- memory policy ----------------------------------------------------------------------------
    @property
    def policy(self) -> OffloadPolicy:
        """What lives in host memory between uses; setting it moves the weights and tells the VAE."""
        return self._policy

    @policy.setter
    def policy(self, policy: OffloadPolicy) -> None:
        self.vae.policy = policy
        self._host_memory.pin_memory = policy.pinned
        for weights, on_host in (
            (self._dit_weights, policy.dit_weights_on_host),
            (self._guidance_weights, policy.guidance_weights_on_host),
        ):
            if on_host:
                weights.to_host()
            else:
                weights.to_device(self.device)
        self.dit.graphs.clear()
        self._policy = policy

    @property
    def offload(self) -> str:
        """The offload mode's name (`OffloadPolicy.from_mode`); setting it sets `policy`. "auto" picks the
        fastest mode that fits at a frame size's first chunk (`memory.plan.choose_mode`) and steps down to the
        next lighter mode when the device runs out of memory anyway, redoing the chunk; reading it then gives
        the mode in use, and `auto_offload` says that the choice is automatic."""
        return self._policy.mode

    @offload.setter
    def offload(self, mode: str) -> None:
        self.auto_offload = mode == AUTO_MODE
        self._planned_size = None
        self.policy = OffloadPolicy.from_mode("none" if self.auto_offload else mode)

    def _stream_kv_cache(self, kv_cache: KVCache | None) -> KVCache | None:
        """An offloaded KV cache as layer-by-layer uploads, the first layer's queued now: called before the
        encoder, so the DiT's first layer does not wait for it (the encoder's work is queued ahead of any upload
        issued after it). The old cache is consumed: each layer's host block is free once queued."""
        if kv_cache is None or not isinstance(kv_cache.keys, HostCache) or not self._policy.kv_cache_on_host:
            return kv_cache
        kv_cache = kv_cache.map(lambda layers: WindowedUpload(layers, self._host_memory, self.device, consume=True))
        for layers in (kv_cache.keys, kv_cache.values):
            layers.start(1)
        return kv_cache

    @torch.inference_mode()
    def dit_step(
        self,
        latents: torch.Tensor,
        prompt: torch.Tensor,
        time_offset: int,
        kv_cache: KVCache | None,
        *,
        decoder_history: VAEHistory | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """One DiT step on a chunk's latents: the prediction, and the KV cache the next chunk reads.

        `kv_cache` is consumed (each layer released as the new one is built), and the policy's moves are made:
        an offloaded KV cache streams through the DiT (each layer's old keys/values uploaded one layer ahead,
        its new ones downloaded as soon as they exist, so the device holds a few layers of either cache, never
        a whole one), offloaded DiT weights come in for the step, and `decoder_history`'s upload starts under
        the DiT where the policy prefetches it. `push` runs it between the VAE's encode and decode; it is
        public so that a measurement can run the DiT alone (bench/).
        """
        policy = self._policy
        if decoder_history is not None and policy.prefetch_decoder_under_dit:
            self.vae.prefetch_decoder(decoder_history)
        # On the CPU: the DiT embeds it there (float64), and reading a GPU tensor would wait for the encoder.
        timestep = torch.full((latents.shape[0],), TIMESTEP, dtype=torch.float32)
        streamed = policy.kv_cache_on_host
        kv_cache = self._stream_kv_cache(kv_cache)
        if kv_cache is not None and isinstance(kv_cache.keys, HostCache):  # offloading was switched off since
            kv_cache = kv_cache.map(lambda layers: self._host_memory.to_device(layers, self.device))
        with self._dit_weights.on_device(self.device):
            prediction, cache = self.dit(
                latents,
                prompt,
                timestep,
                time_offset=time_offset,
                kv_cache=kv_cache,
                release_cache=True,
                keep=self._host_memory.download if streamed else None,
                graph=policy.dit_cuda_graphs,
            )
        if streamed:
            cache = cache.map(lambda layers: self._host_memory.host_list(layers, self.device))
        return prediction, cache

    # -- visual guidance -------------------------------------------------------------------------
    def extract_prompt(self, reference: torch.Tensor) -> torch.Tensor:
        """DAPE visual prompt (1, 145, 512) from one low-resolution frame (H, W, 3) in [0, 1]."""
        if not isinstance(reference, torch.Tensor):
            raise TypeError(f"the reference frame must be a torch.Tensor (H, W, 3), got {type(reference).__name__}")
        if reference.ndim == 4:
            if reference.shape[0] != 1:
                raise UsageError(f"expected one reference frame, got a batch of {reference.shape[0]}")
            reference = reference[0]
        if reference.ndim != 3 or reference.shape[-1] != 3:
            raise UsageError(f"expected a reference frame of shape (H, W, 3), got {tuple(reference.shape)}")
        check_frame_dtype(reference, "the reference frame")
        check_frame_values(reference, "the reference frame")
        return self._extract_prompt(reference)

    @torch.inference_mode()
    def _extract_prompt(self, reference: torch.Tensor) -> torch.Tensor:
        """`extract_prompt` on a frame already checked (a chunk's first frame: `push` checked it)."""
        image = reference.to(self.device, torch.float32).permute(2, 0, 1).unsqueeze(0)
        with self._guidance_weights.on_device(self.device):
            return self.guidance(image)

    # -- sessions -------------------------------------------------------------------------------
    def new_session(self, scale: int = 4, prompt: torch.Tensor | None = None) -> InfVSRSession:
        """A fresh stream. With `prompt` given, it is used for every scene instead of the first frame's."""
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        session = InfVSRSession(model_id=self.model_id, scale=scale)
        if prompt is not None:
            session.prompt = self._check_prompt(prompt)
            session.prompt_fixed = True
        return session

    def push(self, session: InfVSRSession, frames: torch.Tensor, defer: bool = False) -> torch.Tensor:
        """Feed low-resolution frames (T, H, W, 3) in [0, 1]; returns every frame completed so far.

        Frames are held until a whole chunk is available, so the output of any
        batching of the same video is identical, frame for frame. Frames of another
        shape, dtype or range (0-255, NaN; see `FRAME_RANGE`) are refused with a
        `ValueError` before they reach the session.

        `defer`: the last chunk this call computes is returned by the session's next call (`push`, `cut`,
        `close` or `collect`) instead: its frames come to host memory while that call's chunk computes, so
        the device does not idle between chunks while the caller takes them and brings the next ones
        (the frames, their order and the concatenation of all outputs are the same).
        """
        self._check_session(session)
        frames = self._check_frames(session, frames)
        session.pending = frames if session.pending is None else torch.cat([session.pending, frames])
        session.frames_in += int(frames.shape[0])
        return self._hand_out(session, self._upscale_pending_chunks(session, final=False), hold_last=defer)

    def collect(self, session: InfVSRSession) -> torch.Tensor:
        """The frames a deferred `push` held back (none if there are none).

        Also after an interruption: they belong to chunks that completed before it.
        """
        if not isinstance(session, InfVSRSession) or session.model_id != self.model_id:
            self._check_session(session)  # the same errors as every other call
        return self._hand_out(session, session.held)

    def cut(self, session: InfVSRSession) -> torch.Tensor:
        """Scene cut: finish the current scene (its last chunk padded), then reset every cache.

        The next chunk is a 9-frame first chunk with a fresh KV cache, fresh VAE
        histories, time position 0 and (unless the prompt was supplied) a new
        reference frame.
        """
        self._check_session(session)
        result = self._hand_out(session, self._upscale_pending_chunks(session, final=True))
        session.scene = None
        if not session.prompt_fixed:
            session.prompt = None
        return result

    def close(self, session: InfVSRSession) -> torch.Tensor:
        """End of stream: upscale the remaining frames as a padded final chunk."""
        self._check_session(session)
        result = self._hand_out(session, self._upscale_pending_chunks(session, final=True))
        session.closed = True
        self.trim_host_memory()
        return result

    def release_graphs(self) -> None:
        """Drop the DiT's CUDA graphs (offload "none"): their static buffers hold a KV cache's worth of GPU
        memory. Kept across sessions otherwise, so that the next stream of the same size replays at once."""
        self.dit.graphs.clear()

    def trim_host_memory(self) -> int:
        """Give back the page-locked host blocks no state holds any more (after a stream ends); bytes freed."""
        return self._host_memory.trim() + self.vae.trim_host_memory()

    def host_memory(self) -> tuple[int, int]:
        """(bytes of host state held now, bytes of page-locked blocks kept for reuse)."""
        (held, kept), (vae_held, vae_kept) = self._host_memory.host_memory(), self.vae.host_memory()
        return held + vae_held, kept + vae_kept

    def refresh_prompt(self, session: InfVSRSession, frame: torch.Tensor, index: int | None = None) -> None:
        """Take a new reference frame without resetting caches (SPEC section 3's refresh rule)."""
        self._check_session(session)
        if not session.prompt_fixed:
            session.prompt = self.extract_prompt(frame)
            session.reference_index = session.frames_out if index is None else index

    def upscale(self, frames: torch.Tensor, scale: int = 4, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Whole clip in one call: one scene, no scene detection."""
        session = self.new_session(scale, prompt)
        return torch.cat([self.push(session, frames), self.close(session)])

    # -- internals ------------------------------------------------------------------------------
    def _upscale_pending_chunks(self, session: InfVSRSession, final: bool) -> list[PendingFetch]:
        """Upscale every whole chunk pending (with `final`, the rest too, padded); the frames of the chunks held
        back before, then of these, in order. Each chunk's frames are waited for once the next chunk is queued
        (the device goes on with it meanwhile); the last chunk's are not waited for here.

        If a chunk fails, the completed ones stay held for `collect` (the exception goes on)."""
        fetches = list(session.held)
        try:
            while session.pending_frames and (final or session.pending_frames >= session.next_chunk_length):
                frames = self._pop_chunk_frames(session, min(session.pending_frames, session.next_chunk_length))
                fetches.append(self._upscale_one_chunk(session, frames))
                for earlier in fetches[:-1]:
                    earlier.wait()
        except BaseException:
            session.held = fetches
            raise
        return fetches

    def _hand_out(self, session: InfVSRSession, fetches: list[PendingFetch], hold_last: bool = False) -> torch.Tensor:
        """The fetched chunks' frames, waited for and joined; with `hold_last`, the last chunk is held back in the
        session instead (a deferred push), else nothing stays held."""
        session.held = fetches[-1:] if hold_last else []
        return self._join(session, [f.wait() for f in fetches[: len(fetches) - len(session.held)]])

    @staticmethod
    def _pop_chunk_frames(session: InfVSRSession, count: int) -> torch.Tensor:
        """The first `count` pending frames, taken off the session's queue."""
        assert session.pending is not None
        chunk, rest = session.pending[:count], session.pending[count:]
        session.pending = rest if rest.shape[0] else None
        return chunk

    def _upscale_one_chunk(self, session: InfVSRSession, frames: torch.Tensor) -> PendingFetch:
        """`_run_chunk_stages`, marking the session interrupted when it fails (its caches are then incomplete)
        and adding what to change to an out-of-memory error. With `auto_offload`, the mode is planned at a frame
        size's first chunk, and a chunk that runs out of device memory is redone from a copy of the session taken
        before it, in the next lighter mode (no frame lost or repeated): the first `GUARDED_CHUNKS` chunks after
        each plan or step down."""
        self._plan_for(session, frames)
        while True:
            lighter = self._policy.lighter_mode() if self.auto_offload else None
            guarded = lighter is not None and self._guarded_chunks > 0
            before = session.fork() if guarded else None
            try:
                fetch = self._run_chunk_stages(session, frames)
                self._guarded_chunks -= guarded
                return fetch
            except torch.OutOfMemoryError as e:
                self.dit.graphs.clear()
                if before is None:
                    session.interrupted = "out of device memory"
                    raise torch.OutOfMemoryError(f"{e}\n{self._memory_advice(frames)}") from e
                for name in before.__dataclass_fields__:
                    setattr(session, name, getattr(before, name))
                previous, self.policy = self.offload, OffloadPolicy.from_mode(lighter)
                self._guarded_chunks = GUARDED_CHUNKS
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.on_plan(f"out of GPU memory with offload={previous!r}: redoing the chunk with {lighter!r}")
                self._plan_host(self._output_size(session, frames))
            except BaseException as e:
                # The caches were being replaced entry by entry: they now mix two chunks.
                session.interrupted = f"{type(e).__name__}: {e}".strip().rstrip(":")
                raise

    @staticmethod
    def _output_size(session: InfVSRSession, frames: torch.Tensor) -> tuple[int, int]:
        return int(frames.shape[1]) * session.scale, int(frames.shape[2]) * session.scale

    def _plan_for(self, session: InfVSRSession, frames: torch.Tensor) -> None:
        """Once per output size (until it changes): offload="auto" chooses the mode, and offloaded histories
        that host memory cannot hold are given a spill folder."""
        size = self._output_size(session, frames)
        if size == self._planned_size:
            return
        self._planned_size = size
        self._guarded_chunks = GUARDED_CHUNKS
        # Off CUDA every mode keeps everything in the same memory: auto stays at "none", as set.
        if self.auto_offload and self.device.type == "cuda":
            growable = use_growable_segments()
            if growable:
                self.on_plan(growable)
            mode, why = choose_mode(self, *size)
            if mode != self.offload:
                self.policy = OffloadPolicy.from_mode(mode)
            self.on_plan(f"offload={mode!r}: {why}")
        self._plan_host(size)

    def _plan_host(self, size: tuple[int, int]) -> None:
        """Offloaded histories past what host memory can hold go to disk rather than exhaust it (the OS would
        kill the process, losing the run)."""
        spill = plan_spill(self, *size)
        if spill is None:
            return
        budget, why = spill
        folder = Path(self.spill_dir) if self.spill_dir is not None else Path(tempfile.gettempdir())
        self.vae.set_spill(folder, budget / 2**30)
        self.on_plan(f"{why} (in {folder})")

    def _memory_advice(self, frames: torch.Tensor) -> str:
        """What to change after running out of device memory (the same type is re-raised, for ComfyUI)."""
        height, width = int(frames.shape[1]), int(frames.shape[2])  # a chunk: (T, H, W, 3), checked on entry
        lighter = self._policy.lighter_mode()
        hint = (
            f"try offload={lighter!r} (same output; the README's speed table gives each mode's GPU memory)"
            if lighter
            else "this is already the lowest-memory mode: use a smaller input or a GPU with more memory"
        )
        if self.auto_offload:
            hint += (
                f" (offload='auto' redoes only the first {GUARDED_CHUNKS} chunks of a size in a lighter mode; this "
                "one ran out later, e.g. when another program took GPU memory)"
            )
        return f"InfVSR ran out of GPU memory on {height}x{width} input frames with offload={self.offload!r}: {hint}."

    def _stage(self, name: str) -> AbstractContextManager[Any]:
        """The context a chunk's stage runs in: `stage_hook`'s, when one is set."""
        return nullcontext() if self.stage_hook is None else self.stage_hook(name)

    @torch.inference_mode()
    def _run_chunk_stages(self, session: InfVSRSession, frames: torch.Tensor) -> PendingFetch:
        """One chunk through the stages (`STAGES`): the session's caches advance, its frames are on their way."""
        started = time.perf_counter()
        first = session.scene is None
        if first:
            session.scene = SceneState(vae_history=self.vae.new_history())
            session.scenes += 1
        scene = session.scene
        assert scene is not None and chunk_length(first) >= frames.shape[0]
        if session.prompt is None:
            with self._stage("prompt"):
                session.prompt = self._extract_prompt(frames[0])
            session.reference_index = session.frames_out
        with self._stage("prepare"):
            video, true_size = prepare_chunk(frames, session.scale, first, device=self.device, dtype=self.dtype)
        with self._stage("encode"):
            # The DiT consumes the old cache layer by layer: from here the scene holds the new one or nothing.
            kv_cache, scene.kv_cache = self._stream_kv_cache(scene.kv_cache), None
            latents = self.vae.encode_chunk(video, scene.vae_history)
            del video
        with self._stage("dit"):
            prediction, scene.kv_cache = self.dit_step(
                latents, session.prompt, scene.latent_frames, kv_cache, decoder_history=scene.vae_history
            )
            del kv_cache
        scene.latent_frames += latents.shape[2]
        with self._stage("decode"):
            restored = one_step_restore(latents, prediction)
            del prediction, latents
            decoded = self.vae.decode_chunk(restored, scene.vae_history)
        with self._stage("finish"):
            finished = finish_frames(decoded, true_size)
        with self._stage("output"):
            out = self._output_fetch(finished)
        scene.frames += int(frames.shape[0])
        session.frames_out += int(frames.shape[0])
        session.stats["last_chunk_seconds"] = time.perf_counter() - started
        return out

    def _output_fetch(self, frames: torch.Tensor) -> PendingFetch:
        """The chunk's frames on their way to the output device (waited for by whoever takes them).

        To host memory through a page-locked block, on a side stream beside the next chunk's work
        (`HostMemory.fetch_later`); with `output_staging` False, CUDA's own copy into pageable memory instead
        (an A/B for measurements: it holds the host until the copy is done).
        """
        if self.output_device.type == "cpu" and self.output_staging:
            return self._host_memory.fetch_later(frames)
        return PendingFetch(frames.to(self.output_device), None)

    def _join(self, session: InfVSRSession, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) == 1:
            return outputs[0]  # a chunk's frames as they are: a copy of large frames costs host time and memory
        return torch.cat(outputs) if outputs else self.empty_output(session)

    def empty_output(self, session: InfVSRSession, size: tuple[int, int] | None = None) -> torch.Tensor:
        """A (0, H*scale, W*scale, 3) batch: what a call that completed no chunk returns.

        `size` (height, width) stands in for the stream's size before any frame reached the session.
        """
        height, width = session.input_size or size or (0, 0)
        return torch.empty((0, height * session.scale, width * session.scale, 3), device=self.output_device)

    def _check_session(self, session: InfVSRSession) -> None:
        if not isinstance(session, InfVSRSession):
            raise TypeError(f"expected an InfVSRSession, got {type(session).__name__}")
        if session.model_id != self.model_id:
            raise ValueError("this session (cache) was created by a different InfVSR model; start a new session")
        if session.closed:
            raise ValueError("this session is closed (its stream has ended); start a new session")
        if session.interrupted:
            raise ValueError(
                f"this session stopped in the middle of a chunk ({session.interrupted}), so its caches are "
                "incomplete; start a new session (from the first frame of the scene to get the same output)"
            )

    def _check_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        expected = self.dit.config.text_dim
        if prompt.ndim == 2:
            prompt = prompt.unsqueeze(0)
        if prompt.ndim != 3 or prompt.shape[0] != 1 or prompt.shape[-1] != expected:
            raise ValueError(
                f"visual prompt must have shape (1, tokens, {expected}), got {tuple(prompt.shape)}: "
                "was it extracted by a different model?"
            )
        return prompt.to(self.device, self.dtype)

    def _check_frames(self, session: InfVSRSession, frames: torch.Tensor) -> torch.Tensor:
        """The frames as the session holds them (CPU float32), after refusing anything that is not
        (T, H, W, 3) float in `FRAME_RANGE`; nothing in the session changes when they are refused."""
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor (T, H, W, 3), got {type(frames).__name__}")
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise UsageError(
                f"frames must have shape (T, H, W, 3) with 3 RGB channels, got {tuple(frames.shape)}; {FRAMES_EXPECTED}"
            )
        check_frame_dtype(frames, "frames")
        size = (int(frames.shape[1]), int(frames.shape[2]))
        if min(size) < 1:
            raise UsageError(f"frames have an empty size {size[0]}x{size[1]}")
        if session.input_size is not None and size != session.input_size:
            raise ValueError(
                f"frame size changed mid-stream: the stream is {session.input_size[1]}x{session.input_size[0]} "
                f"(width x height) but got {size[1]}x{size[0]}; start a new session for a different size"
            )
        # Reduced where the frames are; read after the copy to the CPU below, which waits for the device anyway.
        extremes = _extremes(frames)
        held = frames.detach().to("cpu", torch.float32)
        check_frame_values(frames, "frames", extremes)
        if session.input_size is None and frames.shape[0]:
            session.input_size = size
        return held


def check_frame_dtype(frames: torch.Tensor, what: str = "frames") -> None:
    """Refuse integer frames (a `UsageError`, a ValueError): uint8 0-255 frames would otherwise be taken as
    values up to 255.

    `frames`: a batch (T, H, W, 3) or one frame (H, W, 3), named `what` in the message.
    """
    one = frames.ndim == 3
    expected = "expected an (H, W, 3) float frame in [0, 1]" if one else FRAMES_EXPECTED
    if frames.dtype == torch.uint8:
        raise UsageError(
            f"{what} {'is' if one else 'are'} uint8 (0-255 values); {expected}: convert with frames.float() / 255"
        )
    if not frames.is_floating_point():
        raise UsageError(f"{what} {'has' if one else 'have'} dtype {frames.dtype}; {expected}")


def check_frame_values(frames: torch.Tensor, what: str = "frames", extremes: torch.Tensor | None = None) -> None:
    """Refuse NaN/inf and values outside `FRAME_RANGE`, which the networks would turn into garbage silently.

    One min/max reduction on the frames' device (NaN and inf show in its result); counting the bad values
    costs a second pass on the error path only. `extremes`: that reduction, when already queued.
    """
    if frames.numel() == 0:
        return
    one = frames.ndim == 3
    expected = "expected an (H, W, 3) float frame in [0, 1]" if one else FRAMES_EXPECTED
    low, high = (_extremes(frames) if extremes is None else extremes).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = ~torch.isfinite(frames.detach())
        count = int(bad.sum())
        where = "" if one else f" in {int(bad.flatten(1).any(1).sum())} of {frames.shape[0]} frames"
        raise UsageError(
            f"{what} {'holds' if one else 'hold'} {count} non-finite value{'s' if count > 1 else ''} (NaN or inf)"
            f"{where}; {expected}: fix or drop {'it' if one else 'them'} upstream"
        )
    lowest, highest = FRAME_RANGE
    if lowest <= low and high <= highest:
        return
    found = f"{what} {'has' if one else 'have'} values from {low:.4g} to {high:.4g}"
    if high > highest and high <= 255 * highest:
        hint = "this looks like 0-255 values: divide by 255"
    elif low < lowest and low >= -1 + lowest and high <= highest:
        hint = "this looks like [-1, 1] values: use (frames + 1) / 2"
    else:
        hint = f"values within [{lowest}, {highest}] are let through for resampling overshoot, not beyond"
    raise UsageError(f"{found}; {expected} ({hint})")


def _extremes(frames: torch.Tensor) -> torch.Tensor:
    """(min, max) of the frames as one tensor of their dtype on their device (empty: zeros); NaN propagates."""
    if frames.numel() == 0:
        return torch.zeros(2, dtype=frames.dtype, device=frames.device)
    low, high = torch.aminmax(frames.detach())
    return torch.stack([low, high])
