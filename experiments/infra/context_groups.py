"""The ranks of a job under parallel.context: data-parallel groups of ulysses x ring ranks, and the
split of a transformer over its group.

A 3-D device mesh (dp, ring, ulysses) over the world, laid out row-major: global rank r belongs to
group r // C (C = ulysses x ring) as its member r % C, so a group's ranks are neighbours (one node's
GPUs where C divides the GPUs per node). Each group makes every (W / C)-th sample, as each rank does
in the data-parallel path; its member 0 alone writes them. diffusers takes the group's (ring, ulysses)
sub-mesh as ``ContextParallelConfig.mesh`` (0.42 splits over whatever mesh it is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from . import distributed
from .context_config import ContextDegrees


@dataclass(frozen=True)
class ContextGroups:
    degrees: ContextDegrees
    index: int  # this rank's data-parallel group: which share of the samples it makes
    count: int  # data-parallel groups
    member: int  # this rank within its context group
    mesh: Any = None  # DeviceMesh (dp, ring, ulysses); None without context parallelism

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's samples (every member computes them)."""
        return self.member == 0

    @property
    def in_first_group(self) -> bool:
        """Latency is timed on one group: all its members run the timed generations together."""
        return self.index == 0

    def split(self, transformer) -> None:
        """Split ``transformer``'s sequence over this rank's context group (nothing without one)."""
        if not self.degrees.on:
            return
        from diffusers import ContextParallelConfig

        if self.degrees.ring > 1 and transformer.device.type == "cuda":
            # diffusers' ring (the plan's full layers) needs each call's log-sum-exp: cuDNN returns it
            transformer.set_attention_backend("_native_cudnn")
        transformer.enable_parallelism(config=ContextParallelConfig(
            ulysses_degree=self.degrees.ulysses, ring_degree=self.degrees.ring, mesh=self.mesh["ring", "ulysses"]))


def context_groups(degrees: ContextDegrees) -> ContextGroups:
    """This rank's groups; every rank must call it (the mesh makes its process groups collectively)."""
    rank, world = distributed.rank(), distributed.world_size()
    if not degrees.on:
        return ContextGroups(degrees, index=rank, count=world, member=0)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // degrees.degree, degrees.ring, degrees.ulysses),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    return ContextGroups(degrees, index=rank // degrees.degree, count=world // degrees.degree,
                         member=rank % degrees.degree, mesh=mesh)
