"""FSDP2 for every network: each transformer block a unit of its own, and whole weights when one process decodes.

Under Lightning's ``ModelParallelStrategy`` each process holds a shard of every parameter, gradient
and optimizer state. A unit's parameters are gathered for its forward and backward and freed after,
so a process holds one block's whole weights at a time (the root unit keeps the embeddings, head
and final norm). Decoding runs a different number of forward passes on each process (sequences end
when they end), which would leave the others waiting in a gather: ``whole_weights`` gathers every
unit once, on every process together, and decoding then runs locally.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from xlab.errors import UserError
from xlab.models.layers import Block

BLOCK_TYPES = (Block, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def shard(network: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``network`` over ``mesh`` in place: every transformer block (XLab's or torch.nn.Transformer's)
    freed after its forward, then the rest as the root unit."""
    for module in network.modules():
        if isinstance(module, BLOCK_TYPES):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(network, mesh=mesh)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of the strategy's mesh; a UserError when the strategy also splits tensors,
    which XLab's layers do not support."""
    if mesh["tensor_parallel"].size() > 1:
        raise UserError(
            "XLab's layers are not split over devices (tensor parallelism): use the strategy xlab.fsdp.FSDP "
            "(-c conf/fsdp.yaml), or set trainer.strategy.init_args.tensor_parallel_size: 1"
        )
    return mesh["data_parallel"]


def is_sharded(network: nn.Module) -> bool:
    return isinstance(network, FSDPModule)


@contextmanager
def whole_weights(network: nn.Module) -> Iterator[None]:
    """Inside, every process holds all of ``network``'s weights and its forward passes gather nothing, so any
    process may run any number of them. Entering and leaving are collective: every process must do both at
    the same point. Nothing changes for a network that is not sharded."""
    units = [module for module in network.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not network, recurse=False)  # the root keeps its weights
