"""``FSDP``: Lightning's ``ModelParallelStrategy`` as plain fully sharded data parallelism (FSDP2) for XLab."""

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP(ModelParallelStrategy):
    """Every process a data-parallel shard, whatever the number of nodes and devices (Lightning's default would
    split tensors over the devices of a node, which XLab's layers do not support), and checkpoints saved
    whole: gathered on the first process into one file that every XLab command reads, resumes from and
    exports, rather than a directory of shards. The networks shard themselves in ``configure_model``
    (``xlab.models.sharding``). ``kwargs`` go to ``ModelParallelStrategy`` (e.g. ``timeout``).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
