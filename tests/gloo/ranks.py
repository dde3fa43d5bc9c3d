"""Start N CPU processes over gloo and run a list of jobs (`tests.gloo.scenarios`) on all of them in turn."""

from __future__ import annotations

import faulthandler
import os
import resource
from pathlib import Path
from typing import Any

import torch

# Each job leaves about 90 sockets, pipes and event descriptors open per rank (the gloo groups megatron-core makes
# live as long as the process): the ranks start afresh every few jobs, to stay well under the common default limit
# of 1,024 open files.
JOBS_PER_START = 4


def run_ranks(world_size: int, jobs: list[tuple[str, dict[str, Any]]], results: Path) -> list[dict]:
    """Run every (scenario name, keyword arguments) job on `world_size` spawned ranks, in order; returns rank 0's
    result of each job. A rank that fails stops them all, with its traceback."""
    from vlm_fsdp.train.parallel import free_port

    results.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(jobs), JOBS_PER_START):
        chunk = jobs[first : first + JOBS_PER_START]
        torch.multiprocessing.spawn(
            _rank, args=(world_size, free_port(), chunk, first, str(results)), nprocs=world_size
        )
    return [torch.load(results / f"job{i}.pt", weights_only=True) for i in range(len(jobs))]


def _rank(rank: int, world_size: int, port: int, jobs: list, first: int, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    faulthandler.enable()  # a rank that aborts in C++ still shows where it was in Python
    _, most = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
    from tests.gloo import cpu

    cpu.install()
    from vlm_fsdp.train.parallel import shutdown

    from tests.gloo import scenarios

    try:
        for index, (name, kwargs) in enumerate(jobs):
            result = getattr(scenarios, name)(**kwargs)
            if rank == 0:
                torch.save(result, Path(results) / f"job{first + index}.pt")
    finally:
        shutdown()
