"""WebDataset shards of a training manifest, and training from them (see docs/data.md).

* :mod:`~mamba_asr.shards.index`: the index ``shards.json`` (:class:`ShardIndex`).
* :mod:`~mamba_asr.shards.writer`: :func:`make_shards` writes shards and their index.
* :mod:`~mamba_asr.shards.fetch`: a shard as a verified local file (downloaded to a cache).
* :mod:`~mamba_asr.shards.plan`: which process and loader worker reads which shard, per epoch.
* :mod:`~mamba_asr.shards.dataset`: the training set read from shards, and its loader.
* :mod:`~mamba_asr.shards.training`: the ``Brain`` side (progress for resuming, epoch stats).
"""
