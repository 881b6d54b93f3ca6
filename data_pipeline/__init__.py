"""The data room: shards in, exactly-once resumable batches out.

Public entry points (import the module you need; this package imports nothing heavy):

- `data_pipeline.config.DataConfig` - the typed `data:` section of a run config.
- `data_pipeline.stream.build_stream(cfg, rank, world_size, *, state=None) -> Stream` - the
  batches of one rank, infinite over epochs, with `state_dict()` / `load_state_dict()` /
  `stats()` / `batches_per_epoch`, and `start_workers()` / `close()` for its loader workers
  (forked once: start them before allocating what they should not share).
- `data_pipeline.synth` - synthetic captioned shapes (images and videos) and their attribute
  vocabulary (COLORS, SHAPES, SIZES, POSITIONS, DIRECTIONS) for the prompt-adherence judge.
- `data_pipeline.write.write_shards` - samples -> WebDataset shards + manifest.json.
- `data_pipeline.inspect_shards.inspect_shards`, `data_pipeline.precompute.precompute`,
  `data_pipeline.bench.bench_loader` - `dit data inspect|precompute`, `dit bench loader`.

Never imports `trainer` or `deepspeed`; never unpickles shard content.
"""
