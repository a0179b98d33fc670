"""Session semantics of the streaming pipeline on tiny fixture weights (CPU, float32)."""

import pytest
import torch

from infvsr_core.schedule import SIGMA, TIMESTEP, finish_frames, prepare_chunk
from infvsr_core.session import InfVSRSession
from tests.conftest import make_clip


def release_loop(pipe, frames: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """A plain re-statement of the release's loop: 9 then 12 frames, one scene, caches by hand."""
    outputs, cache, position, history, prompt = [], None, 0, pipe.vae.new_history(), None
    start, first = 0, True
    while start < frames.shape[0]:
        size = 9 if first else 12
        chunk = frames[start : start + size]
        if prompt is None:
            prompt = pipe.extract_prompt(chunk[0])
        video, true_size = prepare_chunk(chunk, scale, first, device="cpu", dtype=torch.float32)
        latents = pipe.vae.encode_chunk(video, history)
        t = torch.full((1,), TIMESTEP)
        prediction, cache = pipe.dit(latents, prompt, t, time_offset=position, kv_cache=cache)
        position += latents.shape[2]
        restored = latents + prediction * (-SIGMA)
        outputs.append(finish_frames(pipe.vae.decode_chunk(restored, history), true_size))
        start += chunk.shape[0]
        first = False
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def clip():
    return make_clip(40)


@pytest.fixture(scope="module")
def one_shot(tiny_pipeline, clip):
    return tiny_pipeline.upscale(clip, scale=4)


def test_one_shot_matches_the_release_loop(tiny_pipeline, clip, one_shot):
    assert one_shot.shape == (40, 48, 80, 3)
    assert torch.isfinite(one_shot).all()
    reference = release_loop(tiny_pipeline, clip)
    assert torch.equal(one_shot, reference)


@pytest.mark.parametrize("batches", [[1] * 40, [7] * 6, [12] * 4, [100], [3, 20, 1, 16]])
def test_any_batching_is_bit_identical(tiny_pipeline, clip, one_shot, batches):
    session = tiny_pipeline.new_session(scale=4)
    outputs, start = [], 0
    for size in batches:
        outputs.append(tiny_pipeline.push(session, clip[start : start + size]))
        start += size
    outputs.append(tiny_pipeline.close(session))
    assert sum(o.shape[0] for o in outputs) == 40
    assert torch.equal(torch.cat(outputs), one_shot)


def test_frames_are_held_until_a_chunk_is_complete(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    assert tiny_pipeline.push(session, clip[:8]).shape[0] == 0
    assert session.pending_frames == 8
    assert tiny_pipeline.push(session, clip[8:9]).shape[0] == 9  # first chunk: 9 frames
    assert tiny_pipeline.push(session, clip[9:20]).shape[0] == 0
    assert tiny_pipeline.push(session, clip[20:21]).shape[0] == 12
    assert tiny_pipeline.close(session).shape[0] == 0
    assert session.closed and session.frames_in == session.frames_out == 21


@pytest.mark.parametrize("batches", [[12] * 4, [1] * 40, [100], [30, 10]])
def test_deferred_pushes_give_the_same_frames_a_chunk_later(tiny_pipeline, clip, one_shot, batches):
    session = tiny_pipeline.new_session(scale=4)
    returned, start = [], 0
    for size in batches:
        out = tiny_pipeline.push(session, clip[start : start + size], defer=True)
        start += size
        returned.append(out)
        # Everything upscaled so far has come back but the last chunk, held.
        assert len(session.held) == (session.frames_out > 0)
        held = sum(f.frames for f in session.held)
        assert held in (0, 9, 12) and sum(o.shape[0] for o in returned) == session.frames_out - held
    returned.append(tiny_pipeline.close(session))
    assert not session.held
    assert torch.equal(torch.cat(returned), one_shot)


def test_deferred_frames_can_be_collected(tiny_pipeline, clip, one_shot):
    session = tiny_pipeline.new_session()
    assert tiny_pipeline.push(session, clip[:9], defer=True).shape[0] == 0
    fork = session.fork()  # holds the same finished chunk
    first = tiny_pipeline.collect(session)
    assert torch.equal(first, one_shot[:9]) and not session.held
    assert tiny_pipeline.collect(session).shape[0] == 0
    assert torch.equal(tiny_pipeline.collect(fork), one_shot[:9])
    # A scene cut returns the held chunk before the scene's last one.
    cut = tiny_pipeline.new_session()
    tiny_pipeline.push(cut, clip[:15], defer=True)
    assert torch.equal(tiny_pipeline.cut(cut), torch.cat([one_shot[:9], cut_tail(tiny_pipeline, clip)]))


def cut_tail(pipe, clip):
    """The 6 frames after the first chunk, finished as a scene's padded last chunk (what `cut` computes)."""
    session = pipe.new_session()
    pipe.push(session, clip[:15])
    return pipe.cut(session)


def test_a_failed_chunk_keeps_the_held_one_for_collect(tiny_pipeline, clip, one_shot, monkeypatch):
    """Ctrl-C or an error in a chunk: the chunk completed before it (held back by a deferred push) can still be had."""
    session = tiny_pipeline.new_session()
    tiny_pipeline.push(session, clip[:9], defer=True)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tiny_pipeline.vae, "decode_chunk", stop)
        with pytest.raises(KeyboardInterrupt):
            tiny_pipeline.push(session, clip[9:21], defer=True)
    assert session.interrupted
    assert torch.equal(tiny_pipeline.collect(session), one_shot[:9])


def test_stage_hook_wraps_every_stage_in_order_and_changes_nothing(tiny_pipeline, clip, one_shot):
    """The public measurement hook (bench/): each chunk's stages run inside it, by name, in `STAGES` order
    ("prompt" where a reference frame is taken); the frames are the same with it."""
    from contextlib import contextmanager

    from infvsr_core.pipeline import STAGES

    seen = []

    @contextmanager
    def hook(name):
        seen.append(("enter", name))
        yield
        seen.append(("exit", name))

    tiny_pipeline.stage_hook = hook
    try:
        out = tiny_pipeline.upscale(clip[:21], scale=4)
    finally:
        tiny_pipeline.stage_hook = None
    assert torch.equal(out, one_shot[:21])
    names = [name for kind, name in seen if kind == "enter"]
    assert names == list(STAGES) + [s for s in STAGES if s != "prompt"]  # two chunks, one reference frame
    assert seen[::2] == [("enter", n) for n in names] and seen[1::2] == [("exit", n) for n in names]


def test_vae_call_hook_sees_each_encoder_and_decoder_call(tiny_pipeline, clip, one_shot):
    """The VAE's measurement hook (bench/profile_chunk.py --tiles): one encode and one decode call per chunk when
    untiled, each named with its input's size; the frames are the same with it."""
    from contextlib import contextmanager

    calls = []

    @contextmanager
    def hook(name, size):
        calls.append((name, size))
        yield

    tiny_pipeline.vae.call_hook = hook
    try:
        out = tiny_pipeline.upscale(clip[:21], scale=4)
    finally:
        tiny_pipeline.vae.call_hook = None
    assert torch.equal(out, one_shot[:21])
    height, width = (-(-n * 4 // 16) * 16 for n in clip.shape[1:3])  # the padded output frame
    assert calls == [("encode", (height, width)), ("decode", (height // 8, width // 8))] * 2


def test_dit_step_is_the_pipelines_dit_stage(tiny_pipeline, clip):
    """`dit_step` (public for measurements) gives what a push computes: the release loop's DiT call."""
    prompt = tiny_pipeline.extract_prompt(clip[0])
    video, _ = prepare_chunk(clip[:9], 4, True, device="cpu", dtype=torch.float32)
    latents = tiny_pipeline.vae.encode_chunk(video, tiny_pipeline.vae.new_history())
    prediction, cache = tiny_pipeline.dit_step(latents, prompt, 0, None)
    expected, expected_cache = tiny_pipeline.dit(latents, prompt, torch.full((1,), TIMESTEP), time_offset=0)
    assert torch.equal(prediction, expected) and cache.latent_frames == expected_cache.latent_frames
    assert all(torch.equal(a, b) for a, b in zip(cache.keys, expected_cache.keys, strict=True))


def test_one_push_of_many_chunks_waits_each_chunk_after_queueing_the_next(tiny_pipeline, clip, monkeypatch):
    """A chunk's frames are waited for only once the next chunk is queued (the device then has work meanwhile)."""
    from infvsr_core.memory import PendingFetch

    events, real_run, real_wait = [], type(tiny_pipeline)._run_chunk_stages, PendingFetch.wait

    def run(self, session, frames):
        events.append(f"run {session.frames_out}")
        return real_run(self, session, frames)

    def wait(self):
        if self._done is not None or not getattr(self, "_seen", False):
            events.append(f"wait {self.frames}")
        self._seen = True
        return real_wait(self)

    monkeypatch.setattr(type(tiny_pipeline), "_run_chunk_stages", run)
    monkeypatch.setattr(PendingFetch, "wait", wait)
    session = tiny_pipeline.new_session()
    tiny_pipeline.push(session, clip[:33])
    assert events == ["run 0", "run 9", "wait 9", "run 21", "wait 12", "wait 12"]


@pytest.mark.parametrize("length", [1, 2, 5, 9, 10, 13, 22])
def test_every_frame_comes_out_once(tiny_pipeline, length):
    frames = make_clip(length, 8, 12, seed=length)
    out = tiny_pipeline.upscale(frames, scale=2)
    assert out.shape == (length, 16, 24, 3)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_state_does_not_grow_with_the_number_of_chunks(tiny_pipeline):
    frames = make_clip(9 + 12 * 6, 8, 12)
    session = tiny_pipeline.new_session(scale=2)
    sizes = []
    tiny_pipeline.push(session, frames[:9])
    for k in range(6):
        tiny_pipeline.push(session, frames[9 + 12 * k : 21 + 12 * k])
        sizes.append(session.state_bytes())
        assert session.scene.kv_cache.latent_frames == 3
        # 16x24 output padded to 16x32 -> 2x4 latents -> 1x2 patches: 3 latent frames of 2 tokens
        assert all(key.shape[1] == 3 * 2 for key in session.scene.kv_cache.keys)
    assert len(set(sizes)) == 1, sizes
    assert session.scene.latent_frames == 3 + 3 * 6


def test_run_is_deterministic(tiny_models, clip, one_shot):
    from infvsr_core.loader import load_pipeline

    again = load_pipeline(tiny_models, device="cpu", dtype="fp32").upscale(clip, scale=4)
    assert torch.equal(again, one_shot)


def test_cut_resets_the_scene(tiny_pipeline, clip):
    """After a cut, the new scene is upscaled exactly as if it were a fresh stream."""
    session = tiny_pipeline.new_session()
    first = torch.cat([tiny_pipeline.push(session, clip[:15]), tiny_pipeline.cut(session)])
    assert first.shape[0] == 15 and session.scene is None and session.pending is None
    second = torch.cat([tiny_pipeline.push(session, clip[15:]), tiny_pipeline.close(session)])
    assert torch.equal(first, tiny_pipeline.upscale(clip[:15]))
    assert torch.equal(second, tiny_pipeline.upscale(clip[15:]))
    assert session.scenes == 2


def test_fixed_prompt_is_kept_across_cuts(tiny_pipeline, clip):
    prompt = tiny_pipeline.extract_prompt(clip[30])
    assert prompt.shape == (1, 145, 512)
    session = tiny_pipeline.new_session(prompt=prompt)
    tiny_pipeline.push(session, clip[:10])
    tiny_pipeline.cut(session)
    assert session.prompt is not None and torch.equal(session.prompt, prompt)
    # A different prompt changes the output: the guidance is really used.
    out = tiny_pipeline.upscale(clip[:9], prompt=prompt)
    assert not torch.equal(out, tiny_pipeline.upscale(clip[:9]))


def test_refresh_prompt_keeps_caches(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    tiny_pipeline.push(session, clip[:21])
    cache = session.scene.kv_cache
    tiny_pipeline.refresh_prompt(session, clip[21])
    assert session.scene.kv_cache is cache and session.reference_index == 21
    assert not torch.equal(session.prompt, tiny_pipeline.extract_prompt(clip[0]))


def test_bad_inputs_get_clear_errors(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    assert tiny_pipeline.push(session, clip[:0]).shape[0] == 0  # empty batch: nothing, no error
    tiny_pipeline.push(session, clip[:3])
    with pytest.raises(ValueError, match=r"frame size changed mid-stream: the stream is 20x12 .* got 10x12"):
        tiny_pipeline.push(session, clip[3:5, :, :10])
    with pytest.raises(ValueError, match="shape \\(T, H, W, 3\\)"):
        tiny_pipeline.push(session, clip[3:5, ..., :1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_pipeline.push(session, clip[3:5].numpy())
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        tiny_pipeline.new_session(scale=0)
    with pytest.raises(ValueError, match="different model"):
        tiny_pipeline.new_session(prompt=torch.zeros(1, 145, 768))
    tiny_pipeline.close(session)
    with pytest.raises(ValueError, match="session is closed"):
        tiny_pipeline.push(session, clip[:1])
    foreign = InfVSRSession(model_id="another-model")
    with pytest.raises(ValueError, match="different InfVSR model"):
        tiny_pipeline.push(foreign, clip[:1])


def test_fork_gives_an_independent_stream(tiny_pipeline, clip, one_shot):
    session = tiny_pipeline.new_session()
    head = tiny_pipeline.push(session, clip[:15])
    fork = session.fork()
    # Advancing the fork with other frames must leave the original stream untouched.
    tiny_pipeline.push(fork, clip[20:40].flip(0))
    tiny_pipeline.close(fork)
    assert not session.closed and session.pending_frames == 6 and session.frames_out == 9
    tail = torch.cat([tiny_pipeline.push(session, clip[15:]), tiny_pipeline.close(session)])
    assert torch.equal(torch.cat([head, tail]), one_shot)


def test_a_chunk_stopped_half_way_leaves_a_session_that_refuses_to_continue(tiny_pipeline, clip, one_shot, monkeypatch):
    """An interrupt inside a chunk (after the DiT consumed the old cache) must not give silently wrong frames."""
    session = tiny_pipeline.new_session()
    head = tiny_pipeline.push(session, clip[:9])
    saved = session.fork()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tiny_pipeline.vae, "decode_chunk", stop)
        with pytest.raises(KeyboardInterrupt):
            tiny_pipeline.push(session, clip[9:21])
    assert session.interrupted == "KeyboardInterrupt"
    for call in (lambda: tiny_pipeline.push(session, clip[21:25]), lambda: tiny_pipeline.close(session)):
        with pytest.raises(ValueError, match="stopped in the middle of a chunk .*KeyboardInterrupt.* new session"):
            call()
    # A fork taken before the interrupted chunk goes on as if nothing happened.
    tail = torch.cat([tiny_pipeline.push(saved, clip[9:]), tiny_pipeline.close(saved)])
    assert torch.equal(torch.cat([head, tail]), one_shot)


@pytest.mark.parametrize(
    ("mode", "advice"),
    [
        ("none", "offload='state'"),
        ("histories", "offload='state'"),
        ("state", "offload='all'"),
        ("all", "lowest-memory mode"),
    ],
)
def test_running_out_of_device_memory_says_which_offload_to_try(tiny_pipeline, clip, monkeypatch, mode, advice):
    """The same exception type (ComfyUI handles OutOfMemoryError itself), with what to change appended."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    session = tiny_pipeline.new_session()
    try:
        tiny_pipeline.offload = mode
        with monkeypatch.context() as m:
            m.setattr(tiny_pipeline.vae, "decode_chunk", out_of_memory)
            with pytest.raises(torch.OutOfMemoryError) as info:
                tiny_pipeline.push(session, clip[:9])
    finally:
        tiny_pipeline.offload = "none"
    message = str(info.value)
    assert message.startswith("CUDA out of memory") and advice in message and "12x20 input frames" in message
    assert session.interrupted == "out of device memory"


def test_frames_in_0_255_are_refused(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    with pytest.raises(ValueError, match="looks like 0-255 values: divide by 255") as err:
        tiny_pipeline.push(session, clip[:3] * 255)
    assert "expected (T, H, W, 3) float frames in [0, 1]" in str(err.value)
    assert session.pending is None and session.input_size is None and session.frames_in == 0  # nothing taken


def test_uint8_frames_are_refused(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    with pytest.raises(
        ValueError, match=r"frames are uint8 \(0-255 values\); expected .*: convert with frames.float\(\) / 255"
    ):
        tiny_pipeline.push(session, (clip[:3] * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"frames have dtype torch.int64; expected \(T, H, W, 3\) float frames"):
        tiny_pipeline.push(session, clip[:3].long())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_frames_are_refused(tiny_pipeline, clip, bad):
    frames = clip[:4].clone()
    frames[1, 2, 3, 0] = bad
    frames[1, 5, 6, 2] = bad
    frames[3, 0, 0, 1] = bad
    session = tiny_pipeline.new_session()
    with pytest.raises(ValueError, match=r"frames hold 3 non-finite values \(NaN or inf\) in 2 of 4 frames"):
        tiny_pipeline.push(session, frames)
    assert session.pending is None


def test_frames_of_the_wrong_shape_or_convention_are_refused(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    with pytest.raises(ValueError, match=r"shape \(T, H, W, 3\) with 3 RGB channels, got \(3, 3, 12, 20\)"):
        tiny_pipeline.push(session, clip[:3].permute(0, 3, 1, 2))  # (T, C, H, W)
    with pytest.raises(ValueError, match=r"shape \(T, H, W, 3\).*got \(1, 3, 12, 20, 3\)"):
        tiny_pipeline.push(session, clip[None, :3])
    with pytest.raises(ValueError, match=r"looks like \[-1, 1\] values: use \(frames \+ 1\) / 2"):
        tiny_pipeline.push(session, clip[:3] * 2 - 1)
    with pytest.raises(
        ValueError, match=r"values from 57.4 to 9998;.*within \[-0.5, 1.5\] are let through for resampling overshoot"
    ):
        tiny_pipeline.push(session, clip[:3] * 10_000)


def test_slightly_out_of_range_frames_are_accepted(tiny_pipeline, clip):
    """What resampling upstream leaves (rounding just past 0 or 1, a bicubic resize's overshoot) goes through."""
    frames = clip[:9].clone()
    frames[0, 0, 0] = -0.005
    frames[0, 0, 1] = 1.005
    out = tiny_pipeline.upscale(frames, 2)
    assert out.shape == (9, 24, 40, 3) and torch.isfinite(out).all()

    edge = torch.zeros(1, 3, 12, 20)
    edge[..., 4:8, 5:15] = 1
    resized = torch.nn.functional.interpolate(edge, size=(24, 40), mode="bicubic").permute(0, 2, 3, 1)
    assert resized.min() < -0.05 and resized.max() > 1.1  # what ComfyUI's bicubic image resize gives
    session = tiny_pipeline.new_session()
    assert tiny_pipeline.push(session, resized.expand(3, -1, -1, -1)).shape[0] == 0  # held, not refused
    assert session.frames_in == 3


def test_half_precision_frames_are_checked_too(tiny_pipeline, clip):
    session = tiny_pipeline.new_session()
    with pytest.raises(ValueError, match="looks like 0-255 values"):
        tiny_pipeline.push(session, (clip[:3] * 255).half())
    tiny_pipeline.push(session, clip[:3].bfloat16())
    assert session.frames_in == 3


def test_reference_frames_are_checked(tiny_pipeline, clip):
    with pytest.raises(ValueError, match="the reference frame has values .* looks like 0-255 values: divide by 255"):
        tiny_pipeline.extract_prompt(clip[0] * 255)
    with pytest.raises(
        ValueError, match=r"the reference frame is uint8 .* an \(H, W, 3\) float frame .* frames.float\(\) / 255"
    ):
        tiny_pipeline.extract_prompt((clip[0] * 255).to(torch.uint8))
    nan = clip[0].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"the reference frame holds 1 non-finite value \(NaN or inf\); .* fix or drop it upstream"
    ):
        tiny_pipeline.extract_prompt(nan)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        tiny_pipeline.extract_prompt(clip[0].permute(2, 0, 1))
    session = tiny_pipeline.new_session()
    tiny_pipeline.push(session, clip[:9])
    with pytest.raises(ValueError, match="non-finite"):
        tiny_pipeline.refresh_prompt(session, nan)
    assert tiny_pipeline.extract_prompt(clip[0]).shape == (1, 145, 512)


def test_scene_stream_refuses_bad_frames(tiny_pipeline, clip):
    from infvsr_core.scene_stream import SceneStream

    stream = SceneStream(tiny_pipeline, scale=2, detect_scenes=False)
    with pytest.raises(ValueError, match="looks like 0-255 values"):
        stream.push(clip[:3] * 255)


def test_frame_refusals_are_usage_errors(tiny_pipeline, clip):
    """A ValueError, and an InfVSRError: the command line and the nodes show the message as it is."""
    from infvsr_core.errors import InfVSRError, UsageError

    session = tiny_pipeline.new_session()
    for bad in (clip[:3] * 255, clip[:3].to(torch.uint8), clip[:3].permute(0, 3, 1, 2), clip[:3] * float("nan")):
        with pytest.raises(UsageError) as err:
            tiny_pipeline.push(session, bad)
        assert isinstance(err.value, ValueError) and isinstance(err.value, InfVSRError)
