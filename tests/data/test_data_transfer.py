"""uint8 batches: worker -> main process through reused shared memory, normalised on the device."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tests.data.data_helpers import take

from data_pipeline.stream import batch_to_device, build_stream
from data_pipeline.transfer import InSlot, PixelRing


def cpu_reference(pixels: torch.Tensor) -> torch.Tensor:
    """The conversion the loader made in the main process before pixels stayed uint8."""
    x = pixels.numpy()
    out = np.multiply(x, np.float32(1 / 127.5), dtype=np.float32)
    np.subtract(out, np.float32(1.0), out=out)
    return torch.from_numpy(out)


def test_batch_to_device_gives_the_cpu_conversion_bit_for_bit():
    values = torch.arange(256, dtype=torch.uint8)
    hwc = values[torch.randperm(2 * 4 * 8 * 8 * 3, generator=torch.Generator().manual_seed(0)) % 256]
    image = hwc.view(2, 4, 8, 8, 3)[:, 0].permute(0, 3, 1, 2)  # (B, 3, H, W), channels last in memory
    video = hwc.view(2, 4, 8, 8, 3).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
    latent = torch.randn(2, 4, 2, 2)
    batch = {"image": image, "video_lr": video, "latent": latent, "valid": torch.tensor([True, False]),
             "caption": ["a", "b"]}
    out = batch_to_device(batch, torch.device("cpu"))
    for name in ("image", "video_lr"):
        assert out[name].dtype == torch.float32 and out[name].is_contiguous()
        assert torch.equal(out[name], cpu_reference(batch[name]))
    every = batch_to_device({"image": values.view(1, 1, 16, 16)}, torch.device("cpu"))["image"]
    assert torch.equal(every, cpu_reference(values.view(1, 1, 16, 16)))
    assert every.min() == -1.0 and every.max() == 1.0
    assert out["latent"] is latent and out["caption"] == ["a", "b"] and torch.equal(out["valid"], batch["valid"])


def _by_key(batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (b["image"][i], b["image_lr"][i]) for b in batches
            for i, (k, ok) in enumerate(zip(b["__key__"], b["valid"].tolist())) if ok}


@pytest.mark.parametrize("keep", [False, True])
def test_worker_batches_carry_the_in_process_pixels(cfg, keep):
    """Through the slots (each batch dropped before the next) or, once the caller keeps more
    batches than a worker has slots, through the pipe: the same uint8 pixels per sample."""
    options = dict(sr_resolution=64, random_crop=True, batch_size=3)
    reference = build_stream(cfg(**options), 0, 1)
    reference = _by_key(take(reference, reference.batches_per_epoch))
    stream = build_stream(cfg(**options, num_workers=2, prefetch_factor=1), 0, 1)
    batches, got = iter(stream), []
    for _ in range(stream.batches_per_epoch):
        b = next(batches)
        assert b["image"].shape == (3, 3, 64, 64) and b["image_lr"].shape == (3, 3, 32, 32)
        assert b["image"].dtype == torch.uint8 and b["image"].permute(0, 2, 3, 1).is_contiguous()  # channels last
        got.append(b if keep else {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
        del b
    batches.close()
    got = _by_key(got)
    assert got.keys() == reference.keys()
    for key, (image, low) in got.items():
        assert torch.equal(image, reference[key][0]) and torch.equal(low, reference[key][1])


def _put(ring: PixelRing, value: int, n: int = 2, hw: tuple[int, int] = (4, 4)) -> dict:
    """A worker's batch of n 1-frame clips filled with value, value + 1, ...: written where the
    ring allocates them, then put."""
    (pixels,) = ring.allocate(0, [(n, 1, *hw, 3)])
    for i in range(n):
        pixels[i] = value + i
    return ring.put(0, {"__pixels__": pixels})


def test_a_slot_is_reused_only_once_its_batch_is_gone():
    ring = PixelRing(workers=1, slots=2, size=2 * 4 * 4 * 3)
    sent = [_put(ring, 10 * i)["__pixels__"] for i in range(3)]
    assert [type(s) for s in sent] == [InSlot, InSlot, np.ndarray]  # no free slot: through the pipe
    first, second, third = (ring.take({"__pixels__": s}, pin=False)["__pixels__"] for s in sent)
    assert [int(t[1, 0, 0, 0, 0]) for t in (first, second, third)] == [1, 11, 21]
    view = first[:1].permute(0, 4, 1, 2, 3)  # a view holds the slot as the batch did
    del first
    assert isinstance(_put(ring, 30)["__pixels__"], np.ndarray)
    del view
    again = _put(ring, 40)["__pixels__"]
    assert isinstance(again, InSlot) and again.slot == sent[0].slot
    assert int(second[0, 0, 0, 0, 0]) == 10  # the other slot was not written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_with_cuda_pixels_are_pinned_and_the_slot_freed_at_once():
    ring = PixelRing(workers=1, slots=1, size=2 * 4 * 4 * 3)
    pixels = ring.take(_put(ring, 5), pin=True)["__pixels__"]
    assert pixels.is_pinned() and int(pixels[1, 0, 0, 0, 0]) == 6
    assert isinstance(_put(ring, 7)["__pixels__"], InSlot)


def test_a_process_forked_later_never_writes_the_rings_flags():
    """A new set of workers (a stream iterated again after a break) is forked while the caller
    may still hold views of the old ring's slots: they inherit their finalizers, and freeing
    their copies runs them there. It does not map
    this ring (`keep_from_later_forks`), so the finalizer writing a slot's flag was a
    segmentation fault that killed the worker; the main process alone frees slots."""
    ring = PixelRing(1, 2, 64)
    batch = ring.take(_put(ring, 0, n=1, hw=(2, 2)), pin=False)
    ring.keep_from_later_forks()
    pid = os.fork()
    if pid == 0:  # the child: frees its copy of the batch, which runs the slot's finalizer
        batch.clear()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ring.busy[0, 0] == 1  # the main process still holds the batch
    batch.clear()
    assert ring.busy[0, 0] == 0
