"""Ranks of a multi-process job: who am I, joining the group, and the few collectives the stages use.

The world comes from ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, inside an
``srun`` step (what hydra-submitit-launcher runs), from SLURM (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the first node of the job as the master). One process alone is a world of one:
every helper here then does nothing, so the stages have no separate single-process path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

# Ranks that finish their share wait for the slowest in a collective: allow hours, not NCCL's minutes.
TIMEOUT_ENV = "FASTATTN_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 24 * 60
_joins = 0  # process groups this process has joined: each gets fresh keys in a reused store


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, ranges = head.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world this process belongs to, from torchrun's variables first, else an srun step's."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    # SLURM_STEP_ID marks an srun step: a batch script's own shell also sees SLURM_NTASKS, but is one process.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)  # the step's, not the job's
    if "SLURM_STEP_ID" in env and tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ValueError("SLURM_JOB_NODELIST is not set: cannot tell the master node of this SLURM job")
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return World(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)),
                     env.get("MASTER_ADDR") or first_host(nodes), port)
    return World()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence, rank_: int | None = None, size: int | None = None) -> list:
    """This rank's share: every ``size``-th item from ``rank_`` on. Shares are disjoint, cover
    ``items`` and differ in length by at most one; a world larger than ``items`` leaves some empty."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    return list(items[rank_::size])


def _gpu(local_rank: int) -> int:
    # modulo: where SLURM binds one GPU per task, each task sees a single GPU
    return local_rank % max(1, torch.cuda.device_count())


def local_device(device: torch.device) -> torch.device:
    """A bare 'cuda' becomes this rank's GPU, so the ranks of a node do not all pile onto GPU 0."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", _gpu(int(os.environ.get("LOCAL_RANK", 0))))
    return device


@contextlib.contextmanager
def joined(world: World | None = None) -> Iterator[World]:
    """Join the process group of ``world`` (default: from the environment) for the duration, unless
    it is a world of one or the caller has already joined one; leave it afterwards."""
    global _joins
    world = world_from_env() if world is None else world
    if world.size == 1 or dist.is_initialized():
        yield world
        return
    if world.master_addr:  # SLURM: torchrun's env:// rendezvous reads these
        os.environ.setdefault("MASTER_ADDR", world.master_addr)
        os.environ.setdefault("MASTER_PORT", str(world.master_port))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    use_nccl = torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(_gpu(world.local_rank))  # also what a bare 'cuda' means from here on
    timeout = datetime.timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN)))
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
    # torchrun keeps its store across restarts (--max-restarts) and across the jobs of a local sweep:
    # without fresh keys, a rank could read the address a dead or finished predecessor left there.
    _joins += 1
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/join{_joins}", store)
    gpu = torch.device("cuda", _gpu(world.local_rank)) if use_nccl else None
    dist.init_process_group("nccl" if use_nccl else "gloo", store=store, rank=world.rank, world_size=world.size,
                            timeout=timeout, device_id=gpu)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(error: str | None) -> None:
    """Raise on every rank when any rank found ``error``: a check that fails on one rank must not
    leave the others waiting in the next collective."""
    errors = [(r, e) for r, e in enumerate(all_gather(error)) if e]
    if errors:
        r, message = errors[0]
        raise ValueError(message if world_size() == 1 else f"rank {r}: {message}")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_same_config(config: dict) -> None:
    """Fail on every rank, naming the first key, when this rank's config is not rank 0's: ranks
    launched with different overrides would otherwise write a mix of two experiments."""
    mine, main = _flat(config), _flat(broadcast(config))
    differing = sorted(k for k in mine.keys() | main.keys() if mine.get(k, "<unset>") != main.get(k, "<unset>"))
    agree(f"config differs from rank 0's at {differing[0]}: {mine.get(differing[0], '<unset>')!r} here, "
          f"{main.get(differing[0], '<unset>')!r} on rank 0 (launch every rank with the same overrides)"
          if differing else None)


def check_shared_dir(folder: Path) -> None:
    """Fail on every rank unless all ranks see the same ``folder``: they write one set of outputs
    into it and rank 0 reads all of them."""
    token = broadcast(uuid.uuid4().hex)
    marker = folder / f".rank0-{token}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        marker.touch()
    barrier()
    agree(None if marker.exists() else f"output_dir {folder} is not shared with rank 0 (it cannot see rank 0's "
          "files there): put it on a filesystem every node mounts")
    barrier()  # everyone has looked before the marker goes
    if is_main():
        marker.unlink()
