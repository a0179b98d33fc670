"""Offloaded VAE histories spilled to a folder past a host memory budget (memory/spill.py), on the CPU, tiny VAE."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

from infvsr_core.errors import SpillError
from infvsr_core.memory import HostCache, SpilledCache
from infvsr_core.vae import TINY_VAE_BASE_DIM, StreamingVAE, build_vae, random_vae_state_dict

from .conftest import smooth_vae_clip

TILES = dict(tiling="always", tile_size=3, tile_stride=2)  # 4x6 latents -> 6 overlapping tiles


@pytest.fixture(scope="module")
def vae():
    return build_vae(random_vae_state_dict(TINY_VAE_BASE_DIM, seed=2))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return smooth_vae_clip(33, seed=4)


def _stream(sv: StreamingVAE, clip: torch.Tensor, kinds: list | None = None, fork_at: int | None = None):
    """Three chunks (9, 12, 12 frames) encoded and decoded; the kinds of the tile caches after each chunk."""
    history = sv.new_history()
    outs, start = [], 0
    for n in (9, 12, 12):
        latents = sv.encode_chunk(clip[:, :, start : start + n], history)
        sv.prefetch_decoder(history)
        outs.append(sv.decode_chunk(latents, history))
        if kinds is not None:
            caches = [c for t in history.tiles.values() for c in (t.encoder_cache, t.decoder_cache)]
            kinds.append([type(c) for c in caches])
        if fork_at == start:
            forked = history.fork()
            sv.decode_chunk(latents, forked)  # advancing the fork must not change the original
            del forked
        start += n
    return torch.cat(outs, dim=2), history


@pytest.mark.parametrize("budget_gib", [0.0, 0.0004])
def test_spilled_histories_give_the_same_frames(vae, clip, tmp_path, budget_gib):
    """Everything spilled (budget 0) or only the tiles past the budget: bit for bit the offloaded result."""
    plain, plain_history = _stream(StreamingVAE(vae, history_device="cpu", **TILES), clip)
    largest = max(
        sum(t.numel() * t.element_size() for t in tile.decoder_cache if isinstance(t, torch.Tensor))
        for tile in plain_history.tiles.values()
    )
    sv = StreamingVAE(vae, history_device="cpu", **TILES)
    sv.set_spill(tmp_path, budget_gib)
    kinds: list = []
    spilled, history = _stream(sv, clip, kinds, fork_at=9)
    assert torch.equal(spilled, plain)
    last = kinds[-1]
    if budget_gib == 0:
        assert set(last) == {SpilledCache}
    else:  # some tiles stay in host memory, the rest go to disk
        assert set(last) == {SpilledCache, HostCache}
    assert sv.spill.spilled_bytes > 0
    sv.spill.flush()
    held = sv.host_memory()[0]
    assert held <= sv.spill.budget + largest
    files = list(sv.spill.folder.glob("*.pt"))
    assert len(files) == last.count(SpilledCache)  # one file per spilled cache, older ones deleted
    assert not list(sv.spill.folder.glob("*.partial"))
    folder = sv.spill.folder
    del history, spilled
    gc.collect()
    sv.spill.flush()  # deletions run after their writes
    assert not list(folder.glob("*.pt"))
    sv.spill.close()
    assert not folder.exists()


def test_spill_folder_gone_is_a_clear_error(vae, clip, tmp_path):
    sv = StreamingVAE(vae, history_device="cpu", **TILES)
    sv.set_spill(tmp_path / "scratch", 0.0)
    shutil.rmtree(sv.spill.folder)
    with pytest.raises(SpillError, match="spill to .*scratch.*Free disk space"):
        _stream(sv, clip)


def test_spill_settings_are_checked(vae, tmp_path):
    sv = StreamingVAE(vae, history_device="cpu")
    with pytest.raises(ValueError, match="budget"):
        sv.set_spill(tmp_path, None)
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(SpillError, match="cannot create a spill folder"):
        sv.set_spill(target, 1.0)
    sv.set_spill(None)
    assert sv.spill is None


def test_spilled_cache_must_be_read_back_first(vae, tmp_path):
    sv = StreamingVAE(vae, history_device="cpu")
    sv.set_spill(tmp_path, 0.0)
    spilled = sv.spill.write(HostCache([torch.ones(3), None, "Rep", torch.zeros(2, dtype=torch.bfloat16)]))
    with pytest.raises(TypeError, match="read back"):
        sv._host_memory.to_device(spilled, torch.device("cpu"))
    back = sv.spill.read(spilled)
    assert isinstance(back, HostCache) and back[1] is None and back[2] == "Rep"
    assert torch.equal(back[0], torch.ones(3)) and back[3].dtype == torch.bfloat16
