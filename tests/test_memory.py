"""The memory package (infvsr_core/memory/): the offload policy, and state and weights in host memory between
uses (VAE histories, KV cache, DiT weights), bit for bit the resident path.

On the CPU the "host copy" is just another tensor, so these tests run the
offload code path (HostCache / ArrivingCache lists, per-tile moves, prefetch,
the pipeline's KV cache and DiT weight moves) and compare with the plain path.
"""

from __future__ import annotations

import pytest
import torch

from infvsr_core.loader import load_pipeline
from infvsr_core.memory import (
    OFFLOAD_MODES,
    ArrivingCache,
    HostCache,
    HostMemory,
    ManagedCache,
    OffloadPolicy,
    PinnedPool,
    WindowedUpload,
    copy_cache,
)
from infvsr_core.vae import TINY_VAE_BASE_DIM, CallPlan, StreamingVAE, build_vae, random_vae_state_dict

from .conftest import make_clip, smooth_vae_clip


@pytest.fixture(scope="module")
def vae():
    return build_vae(random_vae_state_dict(TINY_VAE_BASE_DIM, seed=0))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return smooth_vae_clip(21, seed=1)


def _stream(sv: StreamingVAE, clip: torch.Tensor, fork_at: int | None = None):
    """Encode + decode the clip in a 9- and a 12-frame chunk; the histories' kinds after each chunk."""
    history = sv.new_history()
    outs, kinds, start = [], [], 0
    for n in (9, 12):
        latents = sv.encode_chunk(clip[:, :, start : start + n], history)
        sv.prefetch_decoder(history)
        outs.append(sv.decode_chunk(latents, history))
        caches = (
            [history.encoder_cache, history.decoder_cache]
            if history.tiles is None
            else [c for tile in history.tiles.values() for c in (tile.encoder_cache, tile.decoder_cache)]
        )
        kinds.append({type(c) for c in caches})
        if fork_at == start:
            forked = history.fork()
            assert {type(c) for c in (forked.encoder_cache, forked.decoder_cache)} <= {HostCache, list}
            # Advancing the fork must not change the original history.
            sv.decode_chunk(latents, forked)
        start += n
    return torch.cat(outs, dim=2), kinds


@pytest.mark.parametrize(("fast", "whole"), [(False, "auto"), (True, False), (True, True)])
@pytest.mark.parametrize("tiled", [False, True])
def test_histories_in_host_memory_are_bit_identical(vae, clip, fast, whole, tiled):
    """Same VAE calls (`whole_chunks` fixed: "auto" would group them differently when offloading)."""
    kwargs = dict(tiling="always", tile_size=3, tile_stride=2, whole_chunks=whole) if tiled else {"whole_chunks": whole}
    plain, _ = _stream(StreamingVAE(vae, fast=fast, **kwargs), clip)
    for prefetch in (True, False):
        offloaded, kinds = _stream(
            StreamingVAE(vae, fast=fast, history_device="cpu", prefetch=prefetch, **kwargs), clip, fork_at=0
        )
        assert torch.equal(offloaded, plain)
        assert kinds[-1] == {HostCache}  # every cache (every tile's) is in host memory between chunks


def test_host_offload_lists(vae):
    sv = StreamingVAE(vae, history_device="cpu")
    tensors = [torch.randn(2, 3), None, "Rep", torch.randn(4).to(torch.bfloat16)]
    host = sv._host_memory.to_host(tensors)
    assert isinstance(host, HostCache) and host[1] is None and host[2] == "Rep"
    assert host[0] is not tensors[0] and torch.equal(host[0], tensors[0]) and host[3].dtype == torch.bfloat16
    assert sv._host_memory.to_host(host) is host  # already there
    back = sv._host_memory.to_device(host, torch.device("cpu"))
    assert isinstance(back, ArrivingCache) and torch.equal(back[3], tensors[3]) and back[0] is not host[0]
    plain = [torch.ones(1)]
    assert sv._host_memory.to_device(plain, torch.device("cpu")) is plain  # not offloaded: left as it is
    channels_last = torch.randn(1, 4, 2, 3, 5).contiguous(memory_format=torch.channels_last_3d)
    assert sv._host_memory.to_host([channels_last])[0].stride() == channels_last.stride()
    with pytest.raises(ValueError, match="history_device"):
        StreamingVAE(vae, history_device="cuda")


@pytest.fixture(scope="module")
def offload_pipe(tiny_models):
    return load_pipeline(tiny_models, device="cpu", dtype="fp32")


@pytest.mark.parametrize("mode", ["histories", "state", "all"])
def test_pipeline_offload_is_bit_identical(offload_pipe, mode):
    clip = make_clip(25)
    offload_pipe.offload = "none"
    reference = offload_pipe.upscale(clip, scale=2)
    weights = [t.clone() for t in offload_pipe._dit_weights.tensors() + offload_pipe._guidance_weights.tensors()]
    offload_pipe.offload = mode
    try:
        session = offload_pipe.new_session(2)
        out = torch.cat([offload_pipe.push(session, clip[:13]), offload_pipe.push(session, clip[13:])])
        out = torch.cat([out, offload_pipe.close(session)])
        assert torch.equal(out, reference)
        history = session.scene.vae_history
        assert isinstance(history.encoder_cache, HostCache) and isinstance(history.decoder_cache, HostCache)
        kv_host = isinstance(session.scene.kv_cache.keys, HostCache)
        assert kv_host == (mode != "histories")
        assert offload_pipe._dit_weights.offloaded == (mode == "all")
        assert offload_pipe._guidance_weights.offloaded == (mode in ("state", "all"))
        held, _ = offload_pipe.host_memory()
        assert held >= history.nbytes()  # the closed session still holds its last state
        # The whole clip in one push (each chunk's first KV layer queued before its encoder): the same output,
        # and between calls nothing stays on the device.
        session = offload_pipe.new_session(2)
        out = offload_pipe.push(session, clip)
        scene = session.scene.vae_history
        kinds = {type(scene.encoder_cache), type(scene.decoder_cache)}
        assert kinds == {HostCache}
        assert torch.equal(torch.cat([out, offload_pipe.close(session)]), reference)
        del scene
    finally:
        offload_pipe.offload = "none"
    del session, history
    offload_pipe.trim_host_memory()
    assert offload_pipe.host_memory() == (0, 0)  # nothing held, nothing kept pinned
    assert not offload_pipe._dit_weights.offloaded and not offload_pipe._guidance_weights.offloaded
    restored = offload_pipe._dit_weights.tensors() + offload_pipe._guidance_weights.tensors()
    assert all(torch.equal(a, b) for a, b in zip(restored, weights, strict=True))
    with pytest.raises(ValueError, match="offload"):
        offload_pipe.offload = "everything"


def test_low_vram_loader_option(tiny_models):
    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32", low_vram=True)
    assert pipe.offload == "all" and pipe.vae.history_device == "cpu" and not pipe.vae.prefetch
    assert load_pipeline(tiny_models, device="cpu", dtype="fp32", offload="histories").offload == "histories"


def test_windowed_upload_reads_a_host_list_entry_by_entry():
    host_memory = HostMemory()
    layers = [torch.randn(3, 4) for _ in range(4)]
    host = host_memory.to_host(layers)
    window = WindowedUpload(host, host_memory, torch.device("cpu"), ahead=1)
    assert len(window) == 4
    first = window[0]
    assert torch.equal(first, layers[0]) and first is not host[0]
    assert set(window._items) == {0, 1}  # entry 1 is queued one ahead, 2 and 3 not yet
    window[0] = None
    with pytest.raises(IndexError, match="dropped"):
        window[0]
    with pytest.raises(TypeError, match="read-only"):
        window[1] = layers[1]
    assert all(torch.equal(window[i], layers[i]) for i in (1, 2, 3))
    assert all(torch.equal(h, t) for h, t in zip(host, layers, strict=True))  # the host list is unchanged


def test_consuming_windowed_upload_frees_each_host_entry_once_queued():
    """A KV cache being replaced: each layer's pinned block is free for a new layer as soon as it is uploaded."""
    host_memory = HostMemory()
    layers = [torch.randn(3, 4) for _ in range(4)]
    host = host_memory.to_host(layers)
    forked = copy_cache(host)  # a forked session's list keeps its own references
    window = WindowedUpload(host, host_memory, torch.device("cpu"), ahead=1, consume=True)
    assert torch.equal(window[0], layers[0])
    assert host[0] is None and host[1] is None and host[2] is not None  # entry 1 was queued one ahead
    assert host_memory.pool.free_bytes == 0  # the fork still holds both blocks
    del forked
    assert host_memory.pool.free_bytes == 2 * 12 * 4
    assert all(torch.equal(window[i], layers[i]) for i in (1, 2, 3)) and all(h is None for h in host)
    assert host_memory.pool.used_bytes == 0


def test_download_and_host_list():
    host_memory = HostMemory()
    tensors = [torch.randn(5), torch.randn(2, 2)]
    host = host_memory.host_list([host_memory.download(t) for t in tensors], torch.device("cpu"))
    assert isinstance(host, HostCache) and host.ready is None
    assert all(h is not t and torch.equal(h, t) for h, t in zip(host, tensors, strict=True))
    back, event = host_memory.upload(host[0], torch.device("cpu"))
    assert event is None and torch.equal(back, tensors[0]) and back is not host[0]


def test_full_resolution_pieces_follow_the_offload(vae):
    """'auto': 4-frame pieces (diffusers' call size) under whole-chunk calls when the histories stay resident (up
    to larger frames with float8 histories), whole calls without them, 2-frame pieces when offloading (memory);
    tiles: whole-chunk calls unless lean, in 4-frame pieces when offloading, unsplit otherwise."""
    from infvsr_core.vae import FP8_OPTIONS, FULL_RES_FRAMES, WHOLE_CHUNK_PIXELS, WHOLE_CHUNK_PIXELS_FP8

    def plan(sv: StreamingVAE, pixels: int = 0, tiled: bool = False):
        return sv._plan(torch.device("cuda"), pixels, tiled)  # the fast forward's choices (CUDA's default)

    tile = 1024 * 1024  # a release tile: larger than WHOLE_CHUNK_PIXELS
    assert plan(StreamingVAE(vae)).piece_frames == 4
    assert plan(StreamingVAE(vae), WHOLE_CHUNK_PIXELS + 1).piece_frames is None  # large frames: diffusers' calls
    assert plan(StreamingVAE(vae, whole_chunks=True), WHOLE_CHUNK_PIXELS + 1).piece_frames == 4
    assert plan(StreamingVAE(vae, whole_chunks=False)).piece_frames is None
    # Float8 histories (dtype fp8): whole-chunk calls up to the larger frames their halved bytes allow (720p).
    fp8 = StreamingVAE(vae, fast_options=FP8_OPTIONS)
    assert WHOLE_CHUNK_PIXELS < 720 * 1280 <= WHOLE_CHUNK_PIXELS_FP8
    assert plan(fp8, 720 * 1280).whole_chunks and plan(fp8, 720 * 1280).piece_frames == 4
    assert not plan(fp8, WHOLE_CHUNK_PIXELS_FP8 + 1).whole_chunks
    assert not plan(StreamingVAE(vae, fast_options=FP8_OPTIONS, history_device="cpu"), 720 * 1280).whole_chunks
    assert plan(StreamingVAE(vae, history_device="cpu")).piece_frames == FULL_RES_FRAMES
    assert plan(StreamingVAE(vae, history_device="cpu", piece_frames=None)).piece_frames is None
    assert plan(StreamingVAE(vae, piece_frames=1)).piece_frames == 1
    # Tiles.
    resident = plan(StreamingVAE(vae), tile, tiled=True)
    assert resident.whole_chunks and resident.piece_frames is None
    offloaded = StreamingVAE(vae, history_device="cpu")
    assert plan(offloaded, tile, tiled=True).whole_chunks and plan(offloaded, tile, tiled=True).piece_frames == 4
    untiled = plan(offloaded, tile)
    assert not untiled.whole_chunks and untiled.piece_frames == FULL_RES_FRAMES  # untiled: as before
    lean = plan(StreamingVAE(vae, history_device="cpu", lean=True), tile, tiled=True)
    assert not lean.whole_chunks and lean.piece_frames == FULL_RES_FRAMES
    assert not plan(StreamingVAE(vae, whole_chunks=False), tile, tiled=True).whole_chunks
    # Diffusers' forward (the CPU's default) keeps its own calls.
    assert plan(StreamingVAE(vae, fast=False)) == CallPlan(fast=False, whole_chunks=False, piece_frames=None)


def test_pipeline_offload_modes_set_the_vae_calls(tiny_pipeline):
    """Only the low-VRAM mode makes the VAE lean (tiles then keep diffusers' calls and 2-frame pieces)."""
    before = tiny_pipeline.offload
    try:
        for mode in ("none", "histories", "state", "all"):
            tiny_pipeline.offload = mode
            assert tiny_pipeline.vae.lean == (mode == "all")
            assert tiny_pipeline.vae.prefetch == (mode != "all")
    finally:
        tiny_pipeline.offload = before


def test_pinned_pool_hands_out_exact_tensors_and_reuses_released_blocks():
    pool = PinnedPool(pin=False)
    like = torch.randn(1, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    first, reused = pool.empty_like(like)
    assert not reused and first.shape == like.shape and first.dtype == like.dtype
    assert first.stride() == like.stride()  # channels-last stays channels-last: a straight copy
    first.copy_(like)
    second, reused = pool.empty_like(like)
    assert not reused and second.data_ptr() != first.data_ptr()  # a live tensor's block is never handed out
    assert pool.used_bytes == 2 * like.numel() * 4 and pool.free_bytes == 0
    address = first.data_ptr()
    assert torch.equal(first, like)
    del first
    other, reused = pool.empty_like(torch.zeros(7, dtype=torch.float16))  # another size: a new block
    assert not reused and pool.free_bytes == like.numel() * 4
    third, reused = pool.empty_like(like)
    assert reused and third.data_ptr() == address and pool.free_bytes == 0
    del second, third, other
    assert pool.trim() == 2 * like.numel() * 4 + 14
    assert pool.free_bytes == 0 and pool.used_bytes == 0
    again, reused = pool.empty_like(like)
    assert not reused


def test_host_offload_keeps_reusing_the_same_blocks_chunk_after_chunk():
    """A history replaced every chunk: the pool settles at the live state plus one released set."""
    host_memory = HostMemory()
    history = host_memory.to_host([torch.randn(2, 3), torch.randn(4)])
    for step in range(5):
        values = [t + step for t in host_memory.to_device(history, torch.device("cpu")).settle()]
        history = host_memory.to_host(values)
        assert all(torch.equal(h, v) for h, v in zip(history, values, strict=True))
    assert host_memory.pool.used_bytes == (6 + 4) * 4 and host_memory.pool.free_bytes <= (6 + 4) * 4
    del history, values
    assert host_memory.trim() == (6 + 4) * 4 * 2
    assert host_memory.pool.free_bytes == 0 and host_memory.pool.used_bytes == 0


def test_pinned_pool_out_of_host_memory_is_a_clear_error():
    pool = PinnedPool(pin=False)
    held, _ = pool.empty_like(torch.zeros(1024))
    huge = torch.empty(2**50, dtype=torch.uint8, device="meta")  # more than any address space
    with pytest.raises(MemoryError, match=r"out of host memory .* on top of 0\.0 GiB held .*4K"):
        pool.empty_like(huge)
    assert pool.used_bytes == 4096 and held.numel() == 1024  # the pool is unchanged


def test_to_device_async_keeps_values_and_cpu_tensors():
    from infvsr_core.memory import to_device_async

    t = torch.randn(3, 4, dtype=torch.float64)
    assert to_device_async(t, "cpu") is t
    assert torch.equal(to_device_async(t, torch.device("cpu")), t)


def test_windowed_upload_start_queues_the_first_entries_now():
    """The pipeline queues the KV cache's first layer before the encoder: `start(n)` uploads entries 0..n-1 at once
    (a consuming window frees their host entries), and reading them later gives the same values."""
    host_memory = HostMemory()
    layers = [torch.randn(3, 4) for _ in range(3)]
    window = WindowedUpload(host_memory.to_host(layers), host_memory, torch.device("cpu"), consume=True)
    window.start(1)
    assert set(window._items) == {0} and window.host[0] is None and window.host[1] is not None
    window.start(10)  # no further than the list
    assert set(window._items) == {0, 1, 2}
    assert all(torch.equal(window[i], layers[i]) for i in range(3))


def test_partial_upload_queues_the_rest_when_given_again_or_read():
    host_memory = HostMemory()
    values = [torch.randn(2, 3), None, torch.randn(4), "Rep", torch.randn(5)]
    host = host_memory.to_host(values)
    cpu = torch.device("cpu")
    partial = host_memory.to_device(host, cpu, count=2)
    assert isinstance(partial, ArrivingCache) and partial.pending is not None and partial.pending[2] == [2, 4]
    assert list.__getitem__(partial, 2) is host[2]  # still the host tensor: its upload is not queued yet
    assert list.__getitem__(partial, 0) is not host[0] and torch.equal(list.__getitem__(partial, 0), values[0])
    assert host_memory.to_device(partial, cpu) is partial and partial.pending is None  # the rest queued now
    settled = partial.settle()
    assert settled[1] is None and settled[3] == "Rep"
    for i in (0, 2, 4):
        assert settled[i] is not host[i] and torch.equal(settled[i], values[i])
    read = host_memory.to_device(host, cpu, count=1)
    assert torch.equal(read[4], values[4]) and read.pending is None  # a read never sees a host tensor
    forked = copy_cache(host_memory.to_device(host, cpu, count=0))
    assert all(t is not h for t, h in zip(forked, host, strict=True) if isinstance(t, torch.Tensor))
    assert host_memory.to_device(host, cpu, count=len(host)).pending is None  # nothing left for later


def test_next_tile_decoder_history_comes_without_its_full_resolution_entries(vae, clip, monkeypatch):
    kwargs = dict(tiling="always", tile_size=3, tile_stride=2, whole_chunks=True)
    plain, _ = _stream(StreamingVAE(vae, fast=True, **kwargs), clip)
    sv = StreamingVAE(vae, fast=True, history_device="cpu", **kwargs)
    seen = []
    with_cache = sv._with_cache

    def spy(owner, attr, run):
        tiles = list(sv._history.tiles.values())
        at = [i for i, tile in enumerate(tiles) if tile is owner]
        following = tiles[at[0] + 1] if at and at[0] + 1 < len(tiles) else None
        if attr == "decoder_cache" and following is not None:
            seen.append(getattr(following.decoder_cache, "pending", None))
        return with_cache(owner, attr, run)

    monkeypatch.setattr(sv, "_with_cache", spy)
    history = sv.new_history()
    sv._history = history
    outs, start = [], 0
    for n in (9, 12):
        latents = sv.encode_chunk(clip[:, :, start : start + n], history)
        outs.append(sv.decode_chunk(latents, history))
        start += n
    assert torch.equal(torch.cat(outs, dim=2), plain)
    later = [pending for pending in seen if pending is not None]  # the second chunk's (the first has no history)
    assert later and all(pending[2] for pending in later)
    tile = next(iter(history.tiles.values())).decoder_cache
    largest = max(t.shape[-2] * t.shape[-1] for t in tile if isinstance(t, torch.Tensor))
    deferred = later[0][2]
    assert all(tile[i].shape[-2] * tile[i].shape[-1] == largest for i in deferred)  # only full-resolution ones
    tensors = [i for i, t in enumerate(tile) if isinstance(t, torch.Tensor)]
    assert deferred == tensors[tensors.index(deferred[0]) :]  # the decoder's last entries


def test_offload_policy_from_each_mode_keeps_more_in_host_memory():
    """Each mode keeps what the one before keeps, and more; only "all" is lean and never uploads ahead."""
    policies = [OffloadPolicy.from_mode(mode) for mode in OFFLOAD_MODES]
    assert [p.mode for p in policies] == ["none", "histories", "state", "all"]
    fields = ("vae_histories_on_host", "kv_cache_on_host", "guidance_weights_on_host", "dit_weights_on_host")
    table = [tuple(getattr(p, f) for f in fields) for p in policies]
    assert table == [
        (False, False, False, False),
        (True, False, False, False),
        (True, True, True, False),
        (True, True, True, True),
    ]
    assert [p.prefetch for p in policies] == [True, True, True, False]
    assert [p.lean for p in policies] == [False, False, False, True]
    assert all(p.pinned for p in policies)
    assert [p.dit_cuda_graphs for p in policies] == [True, False, False, False]
    assert [p.prefetch_decoder_under_dit for p in policies] == [False, True, False, False]
    assert [p.lighter_mode() for p in policies] == ["state", "state", "all", None]
    assert OffloadPolicy() == OffloadPolicy.from_mode("none")
    with pytest.raises(ValueError, match="offload must be one of none, histories, state, all, got 'everything'"):
        OffloadPolicy.from_mode("everything")


def test_pipeline_hands_its_policy_to_the_vae(tiny_pipeline):
    """One policy object: the pipeline's is the VAE's, and its pinning reaches both host memories."""
    import dataclasses

    before = tiny_pipeline.policy
    try:
        pageable = dataclasses.replace(OffloadPolicy.from_mode("state"), pinned=False)
        tiny_pipeline.policy = pageable
        assert tiny_pipeline.offload == "state" and tiny_pipeline.vae.policy is pageable
        assert tiny_pipeline.vae.history_device == "cpu"
        assert not tiny_pipeline._host_memory.pin_memory and not tiny_pipeline.vae._host_memory.pin_memory
        tiny_pipeline.offload = "none"
        assert tiny_pipeline.vae.policy == OffloadPolicy.from_mode("none")
        assert tiny_pipeline.vae.history_device is None and tiny_pipeline._host_memory.pin_memory
    finally:
        tiny_pipeline.policy = before


def test_managed_caches_say_they_are_not_plain_device_lists():
    """The DiT's CUDA graphs take plain lists only: every list type of the memory package is a ManagedCache."""
    host_memory = HostMemory()
    host = host_memory.to_host([torch.randn(2)])
    arriving = host_memory.to_device(host, torch.device("cpu"))
    window = WindowedUpload(host, host_memory, torch.device("cpu"))
    assert all(isinstance(c, ManagedCache) for c in (host, arriving, window))
    assert not isinstance([torch.randn(2)], ManagedCache)


def test_an_upload_owns_its_entries_until_shared():
    """The fast VAE forward may write into an upload's entries (its own copies), never once a copy shares them."""
    upload = HostMemory().to_device(HostCache([torch.randn(2)]), torch.device("cpu"))
    assert isinstance(upload, ArrivingCache) and upload.owns_entries
    shared = copy_cache(upload)
    assert not upload.owns_entries and type(shared) is list and shared[0] is upload[0]
