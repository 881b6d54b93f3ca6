"""The stream inside real torch.distributed ranks (gloo), with DataLoader workers forked after
the process group exists: every rank gets the same number of batches, the union is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.config import DataConfig
from data_pipeline.stream import build_stream


def _rank_main(rank: int, world: int, shards: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = DataConfig(shards=shards, resolution=32, batch_size=3, num_workers=2, shuffle_buffer=4)
        stream = build_stream(cfg, rank, world)
        keys, batches = [], 0
        for batch in stream:
            dist.barrier()  # a rank with fewer batches would hang here, and time out the test
            keys += [k for k, v in zip(batch["__key__"], batch["valid"].tolist()) if v]
            batches += 1
            if batches == stream.batches_per_epoch:
                break
        gathered = [None] * world
        dist.all_gather_object(gathered, {"keys": keys, "batches": batches, "state": stream.state_dict()})
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_workers(tmp_path, shards):
    mp.start_processes(_rank_main, args=(2, str(shards), str(tmp_path)), nprocs=2, start_method="spawn")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result[0]["batches"] == result[1]["batches"] == 5  # ceil(28 / (2 * 3))
    keys = result[0]["keys"] + result[1]["keys"]
    assert len(keys) == len(set(keys)) == 28
    assert result[0]["state"] == result[1]["state"] and result[0]["state"]["epoch"] == 1
