"""Video clips: placed over the whole video in every container (Matroska and WebM headers carry
no frame count), reached by seeking to the keyframe before them rather than decoding every
frame up to their start, and sampled at a target frame rate (data.fps) whatever the source's."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from data_pipeline import transforms
from data_pipeline.config import DataConfig, check_clip_settings
from data_pipeline.errors import SkipSample
from data_pipeline.inspect_shards import inspect_shards
from data_pipeline.transforms import (TransformSpec, _sought, bucket_size, choose_clip, clip_indices, clip_span,
                                      resize_box, video_pixels)
from data_pipeline.write import write_shards

FRAMES, LEVEL = 60, 4  # frame i is a flat grey of i * LEVEL: its index is readable after lossy coding


def _indexed_video(fmt: str, codec: str, keyframes_every: int = 5, rate: int = 12, width: int = 32,
                   rotation: int = 0, pixel_aspect: int = 1, frames: int = FRAMES, muxer: dict = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=muxer or {}) as container:
        stream = container.add_stream(codec, rate=rate, options={"g": str(keyframes_every)})
        stream.width, stream.height, stream.pix_fmt = width, 32, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(pixel_aspect, 1)
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            grey = np.full((32, width, 3), i * LEVEL, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _indices(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / LEVEL) for f in frames]


CONTAINERS = [("mp4", "libx264"), ("matroska", "libx264"), ("webm", "libvpx-vp9")]


@pytest.mark.parametrize("fmt,codec", CONTAINERS)
def test_clips_are_placed_over_the_whole_video_in_every_container(fmt, codec):
    """Before, a Matroska or WebM video (no frame count in the header) always gave its first
    frames: the clip was placed within the clip's own length."""
    data = _indexed_video(fmt, codec)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, frame_stride=3,
                                                resolution=32))
    starts = []
    for u in (0.0, 0.3, 0.7, 0.999):
        frames, start = choose_clip(FRAMES, spec.frame_counts, spec.frame_stride, u)
        got = _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames)
        assert got == [start + i * spec.frame_stride for i in range(frames)], (u, got)
        starts.append(start)
    assert starts == [0, 15, 35, 50]


@pytest.mark.parametrize("fmt,codec", CONTAINERS)
def test_a_seek_reaches_the_frames_that_counting_from_the_first_reaches(fmt, codec):
    """Keyframes every 5 frames: every start, on a keyframe or between two, gives the frames of
    those indices, by seeking (not by the fallback that counts from the first frame)."""
    data = _indexed_video(fmt, codec)
    for start in (1, 4, 5, 6, 23, 50):
        wanted = range(start, start + 10, 3)
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = _sought(container, stream, wanted, stream.average_rate)
            assert frames is not None, start
            assert _indices([f.to_ndarray(format="rgb24", threads=1) for f in frames]) == list(wanted)


def test_a_seek_for_frames_past_the_last_gives_none():
    """What a header that overstates the length leads to: the clip is then placed again within
    the frames counted from the first (test_data_transforms: short videos)."""
    data = _indexed_video("mp4", "libx264")
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert _sought(container, stream, range(55, 64, 4), stream.average_rate) is None


def test_a_clip_after_the_first_frame_is_reached_without_counting_from_it(monkeypatch):
    """The clip comes from the seek: counting every frame from the first (the cost of a clip
    deep in a long video: 137 -> 25 ms for a 30 s 256 px clip) is not done."""
    data = _indexed_video("mp4", "libx264")
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, frame_stride=3,
                                                resolution=32))

    def counted(*args):
        raise AssertionError("counted from the first frame")

    monkeypatch.setattr(transforms, "_counted", counted)
    assert _indices(video_pixels(data, spec, (0.5, 0.5, 0.7)).frames) == [35, 38, 41, 44]


def test_inspect_reports_the_frames_and_upright_size_training_sees(tmp_path):
    """A Matroska video's frame count comes from its duration; a phone video stored 48x32 with
    a display rotation of 90 degrees is reported as 32x48, one coded 32x32 with 2:1 pixels as
    64x32."""
    samples = [{"__key__": "mkv", "mkv": _indexed_video("matroska", "libx264", width=48), "txt": b"a"},
               {"__key__": "turned", "mp4": _indexed_video("mp4", "libx264", width=48, rotation=90), "txt": b"b"},
               {"__key__": "wide", "mp4": _indexed_video("mp4", "libx264", pixel_aspect=2), "txt": b"c"}]
    write_shards(samples, str(tmp_path / "v"), 10, progress=False)
    report = inspect_shards(str(tmp_path / "v"), progress=False)
    assert report.frames == [FRAMES] * 3
    assert dict(report.resolutions) == {"48x32": 1, "32x48": 1, "64x32": 1}
    assert dict(report.rates) == {"12": 3} and report.seconds == [FRAMES / 12] * 3


@pytest.mark.parametrize("rotation", [0, 90])
def test_non_square_pixels_are_shown_stretched(rotation):
    """Frames coded 32x32 at a sample aspect ratio of 2:1 are shown 64x32: the clip lands in
    the 2:1 bucket (1:2 once turned by 90 degrees) and each frame is the coded one stretched
    to it, not a square crop of it."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(4):
            frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    assert bucket_size(45, 2.0) == (32, 64) and bucket_size(45, 0.5) == (64, 32)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, resolution=45,
                                                aspect_buckets=[0.5, 1.0, 2.0]))
    got = video_pixels(buf.getvalue(), spec, (0.5, 0.5, 0.0)).frames
    h, w = (64, 32) if rotation else (32, 64)
    with av.open(io.BytesIO(buf.getvalue())) as container:
        coded = [np.rot90(f.to_ndarray(format="rgb24", threads=1), rotation // 90) for f in container.decode(video=0)]
    want = np.stack([resize_box(np.ascontiguousarray(f), (0, 0, 32, 32), h, w) for f in coded])
    np.testing.assert_array_equal(got, want)


def test_clip_indices_are_the_nearest_frames_to_the_target_times():
    """An integer stride gives every stride-th frame as before; 30 fps sampled at 8 takes the
    frame nearest each 1/8 s (halves up), 6 fps at 8 repeats frames."""
    assert clip_indices(5, 4, 3) == [5, 8, 11, 14] and clip_span(4, 3) == 10
    assert clip_indices(0, 5, 30 / 8) == [0, 4, 8, 11, 15] and clip_span(5, 30 / 8) == 16
    assert clip_indices(2, 6, 6 / 8) == [2, 3, 4, 4, 5, 6] and clip_span(6, 6 / 8) == 5
    assert choose_clip(15, (1, 4, 5), 30 / 8, 0.0) == (4, 0)  # 5 frames need 16 source frames


@pytest.mark.parametrize("fmt,codec", CONTAINERS[:2])
@pytest.mark.parametrize("rate", [6, 10, 24, 30])
def test_clips_at_a_target_fps_span_the_same_time_at_every_source_rate(fmt, codec, rate):
    """data.fps=8: clip frame k is the source frame nearest start + k/8 s, whether the source
    runs at 6, 10, 24 or 30 fps; with data.frame_stride the same 6 frames would span 5 source
    frames, 0.17 s at 30 fps and 0.83 s at 6. Start on the first frame and seek (u > 0)."""
    data = _indexed_video(fmt, codec, rate=rate)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=6, fps=8, resolution=32))
    for u in (0.0, 0.4, 0.999):
        frames, start = choose_clip(FRAMES, spec.frame_counts, rate / 8, u)
        got = _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames)
        assert frames == 6 and len(got) == 6, (u, got)
        times = np.asarray(got) / rate - start / rate
        np.testing.assert_allclose(times, np.arange(6) / 8, atol=0.5 / rate + 1e-9, err_msg=str((u, got)))


def test_a_source_without_a_frame_rate_is_skipped_at_a_target_fps():
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, fps=8, resolution=32))
    with pytest.raises(SkipSample, match="no frame rate"):
        spec.stride(None)
    assert TransformSpec.from_config(DataConfig(shards="unused", kind="video", frame_stride=3)).stride(None) == 3



def _marked_video(degrees: int, hflip: bool, vflip: bool) -> bytes:
    """Two 48x32 frames stored with a white block at the top left and a grey one at the top
    right, and a display matrix of `degrees` counter-clockwise then the flips (PyAV's
    `set_display_rotation`, which writes what ffmpeg reads)."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:8, :8], stored[:8, -8:] = 255, 128
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("degrees", [0, 90, 180, -90])
@pytest.mark.parametrize("hflip,vflip", [(False, False), (True, False), (False, True)])
def test_display_matrices_with_a_mirroring_are_shown_as_a_player_shows_them(degrees, hflip, vflip):
    """A display matrix that mirrors (hflip: libavutil reads it as a rotation of 180 degrees)
    was turned upside down, a vertical flip was dropped: each frame is now the stored one turned
    counter-clockwise, then mirrored, as the matrix says and ffmpeg's autorotate shows it."""
    data = _marked_video(degrees, hflip, vflip)
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        stored = frame.to_ndarray(format="rgb24", threads=1)
        got = transforms.upright_frame(frame)
    want = np.rot90(stored, degrees // 90)
    want = want[::-1 if vflip else 1, ::-1 if hflip else 1]
    np.testing.assert_array_equal(got, want)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=2, resolution=40,
                                                aspect_buckets=[1.5, 1 / 1.5]))
    assert video_pixels(data, spec, (0.5, 0.5, 0.0)).frames.shape == (2, *want.shape[:2], 3)


def _variable_rate_video(fmt: str, times: list[float]) -> bytes:
    """Frame i (a flat grey of i * LEVEL) shown at times[i] seconds: a variable frame rate."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=30, options={"g": "5"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * LEVEL, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_a_variable_rate_clip_spans_the_same_time_from_the_first_frame_as_after_a_seek(fmt):
    """30 frames at 30 fps, then 30 at 10 fps (an average of 15): at data.fps=5 every clip
    steps 0.2 s between frames. The clip starting on the first frame (decoded from it, not
    sought) counted frames instead of reading their times: 0, 0.1, 0.2, 0.3 s, twice as fast."""
    times = [i / 30 for i in range(30)] + [1 + (i + 1) / 10 for i in range(30)]
    data = _variable_rate_video(fmt, times)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, fps=5, resolution=32))
    for u in (0.0, 0.2, 0.5, 0.9):
        got = _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames)
        shown = np.asarray([times[i] for i in got])
        assert len(got) == 4, (u, got)
        np.testing.assert_allclose(shown - shown[0], np.arange(4) * 0.2, atol=0.1, err_msg=str((u, got)))


@pytest.mark.parametrize("fmt,codec", CONTAINERS[1:])
@pytest.mark.parametrize("rate", [12, 30])
def test_a_matroska_video_of_exactly_num_frames_gives_a_clip_of_num_frames(fmt, codec, rate):
    """Matroska and WebM keep times in milliseconds: 16 frames at 12 fps last 1.333 s, 15.996
    frames. The count was truncated to 15, too few for num_frames=16, and the clip fell to the
    1-frame bucket: a still image in place of the video."""
    data = _indexed_video(fmt, codec, rate=rate, frames=16)
    with av.open(io.BytesIO(data)) as container:
        assert transforms.frame_count(container, container.streams.video[0]) == 16
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=16, resolution=32))
    for u in (0.0, 0.5):
        assert _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames) == list(range(16))


@pytest.mark.parametrize("fmt,codec", CONTAINERS[1:])
def test_clips_are_placed_over_a_live_webm_without_a_duration(fmt, codec):
    """A live Matroska/WebM (a browser's MediaRecorder writes them so) has no frame count and
    no duration: its clip was placed within the clip's own length, always its first frames.
    Its packets are counted instead."""
    data = _indexed_video(fmt, codec, muxer={"live": "1"})
    with av.open(io.BytesIO(data)) as container:
        assert transforms.frame_count(container, container.streams.video[0]) == 0
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, frame_stride=3,
                                                resolution=32))
    for u in (0.0, 0.5, 0.9):
        frames, start = choose_clip(FRAMES, spec.frame_counts, spec.frame_stride, u)
        assert _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames) == clip_indices(start, frames, 3), u
    assert transforms.packet_count(data) == FRAMES


def _h264_segment(width: int, height: int, frames: int) -> bytes:
    """A raw H.264 stream of flat frames: two of them one after the other are one stream whose
    resolution changes midway (an SPS of another size), as a cut-and-joined broadcast has."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.full((height, width, 3), 40 * (i % 5), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("first, second", [((128, 32), (32, 32)), ((64, 64), (32, 32)), ((32, 32), (64, 64))])
def test_a_clip_whose_frames_change_size_is_a_corrupt_video(first, second):
    """One crop box, computed on the first frame, was applied to frames of another size: the
    clip trained distorted, or (128x32 then 32x32) the resize raised out of the stream."""
    data = _h264_segment(*first, 8) + _h264_segment(*second, 8)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", resolution=32, num_frames=12))
    for u in (0.0, 0.99):
        with pytest.raises(SkipSample) as skipped:
            video_pixels(data, spec, (0.5, 0.5, u))
        assert skipped.value.reason == "corrupt_video" and "change size" in skipped.value.detail


@pytest.mark.parametrize("aspect", [Fraction(1, 20), Fraction(20, 1)])
def test_a_sample_aspect_ratio_beyond_any_anamorphic_video_is_a_corrupt_video(aspect):
    """A corrupt header's sample aspect ratio (a fuzzed MP4 had 103685/16693607) showed the
    frames 0 pixels wide, and choosing their bucket raised out of the stream (math domain error)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.sample_aspect_ratio = aspect
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", resolution=32, num_frames=4))
    with pytest.raises(SkipSample) as skipped:
        video_pixels(buf.getvalue(), spec, (0.5, 0.5, 0.0))
    assert skipped.value.reason == "corrupt_video" and "sample aspect ratio" in skipped.value.detail


@pytest.mark.parametrize("key, value", [("num_frames", 4), ("frame_stride", 2), ("fps", 8.0), ("frame_buckets", [2])])
def test_clip_settings_of_an_image_stream_are_refused_naming_the_key(key, value):
    """An image stream reads every sample as one image: a clip setting there was ignored."""
    with pytest.raises(ValueError, match=rf"^data\.{key}: is a setting of video clips"):
        check_clip_settings(DataConfig(kind="image", **{key: value}))
    check_clip_settings(DataConfig(kind="video", **{key: value}))


@pytest.mark.parametrize("fmt,codec", CONTAINERS)
def test_a_clip_is_decoded_on_the_workers_own_thread(fmt, codec, monkeypatch):
    """FFmpeg's default gives each decoder a pool of threads (thread_count 0: one a core): in a
    loader worker (one process of several a core) they only compete, and FFmpeg's threads in a
    process that forks workers are what a forked worker hung on in CI."""
    data = _indexed_video(fmt, codec, width=64)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, resolution=32))
    opened, threads, open_, convert = [], [], av.open, transforms.upright_frame

    def recorded(*args, **kwargs):
        opened.append(open_(*args, **kwargs))
        return opened[-1]

    def converted(frame):  # while the decoder is open
        threads.append(opened[-1].streams.video[0].codec_context.thread_count)
        return convert(frame)

    monkeypatch.setattr(av, "open", recorded)
    monkeypatch.setattr(transforms, "upright_frame", converted)
    assert len(video_pixels(data, spec, (0.5, 0.5, 0.5)).frames) == 4
    assert threads == [1] * 4
