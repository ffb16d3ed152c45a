"""BAdam past one GPU, on ``torch.distributed``.

* ``data_parallel``: every rank holds the whole model; the active block's gradients are averaged
  with one all-reduce per step (``DataParallelBlockOptimizer``), the only communication BAdam needs;
* ``fsdp``: the model and the optimizer states sharded over the ranks with FSDP2
  (``shard_model``, ``ShardedBlockOptimizer``), with DCP checkpoints that resume on any rank count.

Importing this package imports neither: ``torch.distributed`` costs about a second at start-up.
"""
