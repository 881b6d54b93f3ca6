from tests.trainer.harness import shapes_shards  # noqa: F401  (session fixture: real tiny shards)
