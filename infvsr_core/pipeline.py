"""The streaming InfVSR pipeline: one DiT step per chunk between a causal VAE encode and decode.

`InfVSRPipeline` holds the three networks; all per-stream state lives in an
`InfVSRSession`, so one loaded pipeline serves any number of streams and a
stream can be resumed from its session object.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

import torch

from .dit import CausalWanDiT, KVCache
from .errors import UsageError
from .guidance import VisualGuidance
from .offload import HostCache, HostOffload, ModuleOffload, PendingFetch, WindowedUpload
from .schedule import TIMESTEP, chunk_length, finish_frames, one_step_restore, prepare_chunk
from .session import InfVSRSession, SceneState
from .vae import StreamingVAE

Offload = Literal["none", "histories", "state", "all"]
OFFLOAD_MODES: tuple[str, ...] = ("none", "histories", "state", "all")

FRAME_RANGE: tuple[float, float] = (-0.5, 1.5)
"""Frame values let through; beyond them frames are refused (see `check_frame_values`).

Frames are meant to be in [0, 1], but resampling upstream overshoots near hard
edges (a bicubic resize, ComfyUI's default, takes a plain black/white edge to
about -0.1 and 1.2, fine patterns to -0.45 and 1.45), and refusing that would
refuse ordinary workflows. What lies beyond is no resampled [0, 1] image: 0-255
values or [-1, 1] values, which would otherwise run and give garbage.
"""

FRAMES_EXPECTED = "expected (T, H, W, 3) float frames in [0, 1]"


class InfVSRPipeline:
    """InfVSR inference over the published networks, streamed chunk by chunk.

    `offload` keeps state off the accelerator between uses, in host memory
    (pinned, with asynchronous copies on side streams; the results are bit for
    bit the same):

    - "none": everything stays on the device (fastest, most memory);
    - "histories": the VAE's causal histories (the largest state: ~6.5 GiB at
      720p), the encoder's while the DiT and decoder run and vice versa, and
      per tile when tiled; the decoder's upload overlaps the DiT;
    - "state": also the DiT's rolling KV cache (1.9 GiB at 720p, 17 GiB at 4K),
      streamed through the DiT a layer at a time, and the visual guidance's
      weights outside prompt extraction;
    - "all" (low-VRAM): also the DiT's weights outside the DiT, and no
      prefetching ahead, so only the running stage's state is on the device.

    With histories offloaded, the VAE's full-resolution stages also run a few
    frames at a time (`StreamingVAE.piece_frames`), for a lower peak.
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
        offload: Offload | None = None,
    ) -> None:
        self.dit = dit.eval().requires_grad_(False)
        self.vae = vae
        self.guidance = guidance.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.model_id = model_id or uuid.uuid4().hex
        self._host = HostOffload()
        self._dit_weights = ModuleOffload(self.dit, self._host)
        self._guidance_weights = ModuleOffload(self.guidance, self._host)
        self._offload = "none"
        # None: as the VAE was built (its history_device), nothing else offloaded.
        self.offload = offload or ("none" if vae.history_device is None else "histories")

    # -- offload --------------------------------------------------------------------------------
    @property
    def offload(self) -> str:
        return self._offload

    @offload.setter
    def offload(self, mode: str) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        self.vae.history_device = None if mode == "none" else "cpu"
        self.vae.prefetch = mode != "all"
        self.vae.lean = mode == "all"
        for weights, offloaded in ((self._dit_weights, ("all",)), (self._guidance_weights, ("state", "all"))):
            if mode in offloaded:
                weights.to_host()
            else:
                weights.to_device(self.device)
        self.dit.graphs.clear()
        self._offload = mode

    def _prefetch_decoder(self, history) -> None:
        """Start the decoder history's upload under the DiT, where nothing else needs the copy engine.

        Not with the KV cache streamed ("state", "all"): its per-layer uploads would
        queue behind the history's gigabytes and stall every layer. The history then
        comes in at decode time, entry by entry as the decoder reaches them.
        """
        if self.offload == "histories":
            self.vae.prefetch_decoder(history)

    def _stream_kv(self, kv_cache: KVCache | None) -> KVCache | None:
        """An offloaded KV cache as layer-by-layer uploads ("state", "all"), the first layer's queued now: called
        before the encoder, so the DiT's first layer does not wait for it (the encoder's work is queued ahead of
        any upload issued after it). The old cache is consumed: each layer's host block is free once queued."""
        if kv_cache is None or not isinstance(kv_cache.keys, HostCache) or self.offload not in ("state", "all"):
            return kv_cache
        kv_cache = kv_cache.map(lambda layers: WindowedUpload(layers, self._host, self.device, consume=True))
        for layers in (kv_cache.keys, kv_cache.values):
            layers.start(1)
        return kv_cache

    def _run_dit(self, latents, prompt, timestep, time_offset: int, kv_cache: KVCache | None):
        """One DiT step; the old cache is released layer by layer as the new one is built.

        With the KV cache offloaded ("state", "all"), it streams through the DiT:
        each layer's old keys/values are uploaded one layer ahead and its new
        ones downloaded as soon as they exist, so the device never holds more
        than a few layers of either cache (the whole cache is 18 GiB at 4K).
        """
        streamed = self.offload in ("state", "all")
        kv_cache = self._stream_kv(kv_cache)
        if kv_cache is not None and isinstance(kv_cache.keys, HostCache):  # offloading was switched off since
            kv_cache = kv_cache.map(lambda layers: self._host.to_device(layers, self.device))
        with self._dit_weights.on_device(self.device):
            prediction, cache = self.dit(
                latents,
                prompt,
                timestep,
                time_offset=time_offset,
                kv_cache=kv_cache,
                release_cache=True,
                keep=self._host.download if streamed else None,
                # CUDA graphs keep a KV cache's worth of static buffers: for the fast mode only (at 1080p,
                # "histories" would pass 24 GiB), where the DiT's launches are what the GPU waits on (480p).
                graph=self.offload == "none",
            )
        if streamed:
            cache = cache.map(lambda layers: self._host.host_list(layers, self.device))
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
        return self._hand_out(session, self._run_chunks(session, final=False), hold_last=defer)

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
        result = self._hand_out(session, self._run_chunks(session, final=True))
        session.scene = None
        if not session.prompt_fixed:
            session.prompt = None
        return result

    def close(self, session: InfVSRSession) -> torch.Tensor:
        """End of stream: upscale the remaining frames as a padded final chunk."""
        self._check_session(session)
        result = self._hand_out(session, self._run_chunks(session, final=True))
        session.closed = True
        self.trim_host_memory()
        return result

    def release_graphs(self) -> None:
        """Drop the DiT's CUDA graphs (offload "none"): their static buffers hold a KV cache's worth of GPU
        memory. Kept across sessions otherwise, so that the next stream of the same size replays at once."""
        self.dit.graphs.clear()

    def trim_host_memory(self) -> int:
        """Give back the page-locked host blocks no state holds any more (after a stream ends); bytes freed."""
        return self._host.trim() + self.vae.trim_host_memory()

    def host_memory(self) -> tuple[int, int]:
        """(bytes of host state held now, bytes of page-locked blocks kept for reuse)."""
        (held, kept), (vae_held, vae_kept) = self._host.host_memory(), self.vae.host_memory()
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
    def _run_chunks(self, session: InfVSRSession, final: bool) -> list[PendingFetch]:
        """Upscale every whole chunk pending (with `final`, the rest too, padded); the frames of the chunks held
        back before, then of these, in order. Each chunk's frames are waited for once the next chunk is queued
        (the device goes on with it meanwhile); the last chunk's are not waited for here.

        If a chunk fails, the completed ones stay held for `collect` (the exception goes on)."""
        fetches = list(session.held)
        try:
            while session.pending_frames and (final or session.pending_frames >= session.next_chunk_length):
                fetches.append(self._take_chunk(session, min(session.pending_frames, session.next_chunk_length)))
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

    def _take_chunk(self, session: InfVSRSession, count: int) -> PendingFetch:
        assert session.pending is not None
        chunk, rest = session.pending[:count], session.pending[count:]
        session.pending = rest if rest.shape[0] else None
        return self._upscale_chunk(session, chunk)

    def _upscale_chunk(self, session: InfVSRSession, frames: torch.Tensor) -> PendingFetch:
        try:
            return self._run_chunk(session, frames)
        except torch.OutOfMemoryError as e:
            session.interrupted = "out of device memory"
            self.dit.graphs.clear()
            raise torch.OutOfMemoryError(f"{e}\n{self._memory_advice(frames)}") from e
        except BaseException as e:
            # The caches were being replaced entry by entry: they now mix two chunks.
            session.interrupted = f"{type(e).__name__}: {e}".strip().rstrip(":")
            raise

    def _memory_advice(self, frames: torch.Tensor) -> str:
        """What to change after running out of device memory (the same type is re-raised, for ComfyUI)."""
        height, width = int(frames.shape[1]), int(frames.shape[2])  # a chunk: (T, H, W, 3), checked on entry
        # "histories" is not suggested: "state" needs less memory and was as fast or faster where measured (1080p:
        # 14.4 GiB at 8.0 fps against 23.5 GiB at 7.3; bench/RESULTS.md rounds 6 and 9).
        lighter = [mode for mode in ("state", "all") if OFFLOAD_MODES.index(mode) > OFFLOAD_MODES.index(self.offload)]
        hint = (
            f"try offload={lighter[0]!r} (same output; measured on an H100: 720p needs ~15 GiB with 'none', "
            "~9.6 GiB with 'state', ~6.9 GiB with 'all'; 1080p ~38 / ~15 / ~8.1 GiB with 'none' / 'state' / 'all'; "
            "4K ~16 GiB with 'state')"
            if lighter
            else "this is already the lowest-memory mode: use a smaller input or a GPU with more memory"
        )
        return f"InfVSR ran out of GPU memory on {height}x{width} input frames with offload={self.offload!r}: {hint}."

    @torch.inference_mode()
    def _run_chunk(self, session: InfVSRSession, frames: torch.Tensor) -> PendingFetch:
        started = time.perf_counter()
        first = session.scene is None
        if first:
            session.scene = SceneState(vae_history=self.vae.new_history())
            session.scenes += 1
        scene = session.scene
        assert scene is not None and chunk_length(first) >= frames.shape[0]
        if session.prompt is None:
            session.prompt = self._extract_prompt(frames[0])
            session.reference_index = session.frames_out
        video, true_size = prepare_chunk(frames, session.scale, first, device=self.device, dtype=self.dtype)
        # The DiT consumes the old cache layer by layer: from here the scene holds the new one or nothing.
        kv_cache, scene.kv_cache = self._stream_kv(scene.kv_cache), None
        latents = self.vae.encode_chunk(video, scene.vae_history)
        del video
        self._prefetch_decoder(scene.vae_history)
        # On the CPU: the DiT embeds it there (float64), and reading a GPU tensor would wait for the encoder.
        timestep = torch.full((latents.shape[0],), TIMESTEP, dtype=torch.float32)
        prediction, scene.kv_cache = self._run_dit(latents, session.prompt, timestep, scene.latent_frames, kv_cache)
        del kv_cache
        scene.latent_frames += latents.shape[2]
        restored = one_step_restore(latents, prediction)
        del prediction, latents
        decoded = self.vae.decode_chunk(restored, scene.vae_history)
        out = self._to_output(finish_frames(decoded, true_size))
        scene.frames += int(frames.shape[0])
        session.frames_out += int(frames.shape[0])
        session.stats["last_chunk_seconds"] = time.perf_counter() - started
        return out

    def _to_output(self, frames: torch.Tensor) -> PendingFetch:
        """The chunk's frames on their way to the output device (waited for by whoever takes them)."""
        if self.output_device.type == "cpu":
            return self._host.fetch_later(frames)
        return PendingFetch(frames.to(self.output_device), None)

    def _join(self, session: InfVSRSession, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) == 1:
            return outputs[0]  # a chunk's frames as they are: a copy of a 1080p chunk is 300 MB
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
