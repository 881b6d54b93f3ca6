"""A video's frames as training counts and indexes them, wherever its header or timestamps fall
short: `dit data inspect` counts a live WebM's frames as training does, and a clip sought in an
AVI whose decoder delays frames (B-frames, x264) starts on its own start frame."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.inspect_shards import inspect_shards
from data_pipeline.transforms import TransformSpec, _sought, choose_clip, clip_indices, video_pixels
from data_pipeline.write import write_shards

FRAMES, LEVEL, RATE = 60, 4, 12  # frame i is a flat grey of i * LEVEL: its index is readable after lossy coding


def _indexed_video(fmt: str, codec: str, options: dict, muxer: dict = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=muxer or {}) as container:
        stream = container.add_stream(codec, rate=RATE, options=options)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.bit_rate = 2_000_000  # mpeg4's default rate blurs neighbouring greys together
        for i in range(FRAMES):
            grey = np.full((32, 32, 3), i * LEVEL, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _indices(frames) -> list[int]:
    return [round(float(np.asarray(f).mean()) / LEVEL) for f in frames]


def test_inspect_counts_the_frames_of_a_live_webm_as_training_does(tmp_path):
    """A live WebM (a browser's MediaRecorder writes it so) has neither frame count nor
    duration in its header; training counts its packets, inspect reported 0 frames and 0 s."""
    data = _indexed_video("webm", "libvpx-vp9", {"g": "5"}, muxer={"live": "1"})
    write_shards([{"__key__": "live", "webm": data, "txt": b"a"}], str(tmp_path / "v"), 10, progress=False)
    report = inspect_shards(str(tmp_path / "v"), progress=False)
    assert report.frames == [FRAMES]
    assert dict(report.rates) == {"12": 1} and report.seconds == [FRAMES / RATE]


AVI_B_FRAMES = [("libx264", {"g": "5", "bf": "2"}), ("mpeg4", {"g": "5", "bf": "2"})]


@pytest.mark.parametrize("codec,options", AVI_B_FRAMES)
def test_a_clip_of_an_avi_with_b_frames_starts_on_its_start_frame(codec, options):
    """An AVI stores no presentation times: a decoder that delays frames shows the first at 1
    while the stream starts at 0. Counted from the stream's start, each sought clip began one
    frame before its start; it now takes the frames that decoding from the first gives. (The
    mpeg4 clips were right before too: every seek landed past the start and fell back to
    counting from the first frame; now those starting on a keyframe are sought.)"""
    data = _indexed_video("avi", codec, options)
    with av.open(io.BytesIO(data)) as container:
        assert _indices(f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)) == list(range(FRAMES))
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, frame_stride=3,
                                                resolution=32))
    for u in (0.3, 0.7, 0.999):
        frames, start = choose_clip(FRAMES, spec.frame_counts, spec.frame_stride, u)
        assert _indices(video_pixels(data, spec, (0.5, 0.5, u)).frames) == clip_indices(start, frames, 3), u


def test_a_seek_in_an_avi_with_b_frames_reaches_the_wanted_frames():
    """The seek itself (not the fallback that counts from the first frame) gives frames of the
    wanted indices, from starts on a keyframe (every 5th) and between two."""
    data = _indexed_video("avi", "libx264", {"g": "5", "bf": "2"})
    for start in (1, 4, 5, 6, 23, 40):
        wanted = list(range(start, start + 10, 3))
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = _sought(container, stream, wanted, stream.average_rate)
            assert frames is not None, start
            assert _indices(f.to_ndarray(format="rgb24", threads=1) for f in frames) == wanted, start
