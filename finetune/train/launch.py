"""More than one training process: on one machine (every GPU, or CPU processes), or on several machines.

`python -m finetune.train` is both the launcher and the worker. When the config asks for more than one
process (train.distributed: processes per node x nodes), the launcher starts the workers through torch's
elastic agent (what `torchrun` runs) with the c10d rendezvous, then waits; each worker is
`python -m finetune.train` again and trains its share of every batch with the transformers Trainer, in the
strategy train.distributed.strategy names (sft.strategy_kwargs): DistributedDataParallel (gloo between CPU
processes, NCCL between GPUs), DeepSpeed ZeRO-2 or ZeRO-3, or FSDP2 (GPUs only). With the same effective
batch (per-device batch x processes x grad_accum) and the same threads per process, 2 DDP processes train
the same bytes as 1 process accumulating 2 micro-batches (measured: DDP sums the two gradients,
accumulation adds them, and a sum of two floats does not depend on their order); ZeRO groups those sums
otherwise and agrees to float rounding.

Ranks: the c10d rendezvous numbers the machines by their host names, so the workers number themselves by
the node rank they are given instead (node_rank x processes + local rank): global rank 0 is always local
rank 0 of node 0, the machine the user runs the later stages on. Only rank 0 writes what a later stage reads
(the published train/ directory: merged model, metrics, summary; and the checkpoints); the other ranks
write nothing there. Each machine needs the base model: rank 0 prepares it first, then the first process
of every other machine that does not see rank 0's files (no shared filesystem), then everyone reads it.
Without a shared filesystem every machine keeps its own checkpoints (transformers' save_on_each_node), so
that a resumed run finds them everywhere.

A failed worker stops the run: the launcher names it (rank, node, local rank, exit code or signal) and
exits 1; nothing is published, and the next `invoke train` resumes from the last checkpoint. A worker's own
stage error (a TrainError: exit 2) exits 2, as a single process does.

The node rank and the rendezvous address differ per machine and change nothing in the result, so they come
from the environment (`invoke train --node-rank R --rendezvous HOST:PORT` sets them), not from the config.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from finetune.core import machine
from finetune.core.layout import NODE_RANK_ENV, RENDEZVOUS_ENV

LOCAL_RENDEZVOUS = "127.0.0.1:29400"  # one machine: the processes meet on loopback only
RENDEZVOUS_ID = "finetune-train"  # the same on every node, whatever each calls its run; one job per endpoint
JOIN_TIMEOUT_S = 600  # the nodes of a run must all have started within this
TIMEOUT_S = 1800  # a collective may wait this long for a slow rank (rank 0 merging a large model)


class LaunchError(RuntimeError):
    """A node rank or rendezvous that does not fit the config; the message says what to give."""


@dataclass(frozen=True)
class World:
    """The processes of one run: how many, where, and which one this is."""

    strategy: str  # none (one process), ddp, zero2, zero3, fsdp2
    nodes: int
    processes: int  # per node
    node_rank: int
    rendezvous: str

    @property
    def size(self) -> int:
        return self.nodes * self.processes

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def rank(self) -> int:
        """This process's global rank: node rank x processes + local rank."""
        return self.node_rank * self.processes + self.local_rank

    def describe(self) -> str:
        if self.size == 1:
            return "1 process"
        where = f"{self.nodes} nodes x {self.processes}" if self.nodes > 1 else f"{self.processes}"
        return f"{where} processes ({self.strategy}, world size {self.size})"


def world(distributed) -> World:
    """The World of `train.distributed` on this machine: processes `auto` is one per visible GPU, else 1
    (`invoke train` resolves it on the host, so that the stage's key has the number); strategy `auto` is ddp
    for more than one process, and any strategy is none for one."""
    processes = distributed.processes
    if processes == "auto":
        processes = max(machine.cuda_devices(), 1)
    size = processes * distributed.nodes
    strategy = distributed.strategy
    if size == 1:
        strategy = "none"  # one process has nothing to share: the sharding strategies begin at two
    elif strategy == "auto":
        strategy = "ddp"
    node_rank = int(os.environ.get(NODE_RANK_ENV, "0"))
    if not 0 <= node_rank < distributed.nodes:
        raise LaunchError(f"node rank {node_rank} is outside 0..{distributed.nodes - 1} "
                         f"(train.distributed.nodes={distributed.nodes}); give --node-rank from 0 to nodes - 1")
    given = os.environ.get(RENDEZVOUS_ENV)
    if distributed.nodes > 1 and not given:
        raise LaunchError(f"train.distributed.nodes={distributed.nodes} needs the rendezvous address: give "
                         "--rendezvous HOST:PORT, HOST being node 0's address that every node can reach")
    return World(strategy, distributed.nodes, processes, node_rank, given or LOCAL_RENDEZVOUS)


def plan(argv: list[str]) -> World | None:
    """The World to launch for this command line (`--config C --out D`), or None: one process, or a config
    problem that the stage itself then reports."""
    import argparse

    from finetune.core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    try:
        w = world(load_config(parser.parse_known_args(argv)[0].config).train.distributed)
    except (ConfigError, LaunchError, OSError, TypeError):
        return None
    return w if w.size > 1 else None


def is_worker() -> bool:
    """Whether this process was started by the elastic agent (launch below)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch(w: World, argv: list[str]) -> int:
    """Start this node's workers (`python -m finetune.train argv`), wait for all of them; return the exit code:
    0, 2 when a worker stopped on a stage error (it printed the message), else 1 after naming the failed rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    local = w.nodes == 1
    config = LaunchConfig(
        min_nodes=w.nodes, max_nodes=w.nodes, nproc_per_node=w.processes, run_id=RENDEZVOUS_ID,
        rdzv_backend="c10d", rdzv_endpoint=w.rendezvous,
        rdzv_configs={"timeout": JOIN_TIMEOUT_S, "is_host": w.node_rank == 0},  # node 0 holds the store
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        local_addr="127.0.0.1" if local else None,  # one machine: the processes address each other on loopback
    )
    env_before = dict(os.environ)
    if local:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    print(f"train: launching {w.describe()} on node {w.node_rank} (rendezvous {w.rendezvous})", flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", "finetune.train", *argv)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.exitcode == 2:  # the stage's own error, already printed by the worker
            return 2
        rank = w.node_rank * w.processes + failure.local_rank
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with {failure.exitcode}")
        print(f"train: rank {rank} (node {w.node_rank}, local rank {failure.local_rank}, pid {failure.pid}) {how}; "
              "the run stopped and nothing was published; rerun `invoke train` to resume from the last "
              "checkpoint", file=sys.stderr, flush=True)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return 0


class Group:
    """This worker's place in the process group, with the few collectives the stage needs around the
    Trainer (which does the training's own communication)."""

    def __init__(self, w: World, device: str):
        self.world = w
        self.active = w.size > 1
        if not self.active:
            return
        import datetime

        import torch.distributed as dist

        # Rank by node rank (see the module docstring); the agent's MASTER_ADDR/PORT and store stay as they are.
        os.environ["RANK"] = str(w.rank)
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            import torch

            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes what later stages read."""
        return self.world.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """`value` of every rank, in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world.size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, value):
        """Rank 0's `value`, on every rank."""
        return self.gather(value)[0]

    def shares_storage(self, out: Path) -> bool:
        """Whether every rank sees rank 0's files in the run directory `out` (one machine, or a shared
        filesystem): rank 0 writes a random token there for a moment, every rank looks for it."""
        if not self.active or self.world.nodes == 1:
            return True
        token = self.from_main(uuid.uuid4().hex)
        marker = out / f".rank0-{token}"
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.barrier()
        sees = all(self.gather(marker.is_file()))  # a collective: every rank has looked when it returns
        if self.is_main:
            marker.unlink()
        return sees

    def prepare_once_per_storage(self, shared: bool, prepare):
        """Run `prepare()` on rank 0 first, then on the first process of every machine that does not share
        rank 0's storage, then on all the others (which then find it done); return its result."""
        if self.is_main:
            result = prepare()
        self.barrier()
        if not self.is_main and self.world.local_rank == 0 and not shared:
            result = prepare()
        self.barrier()
        if not self.is_main and (shared or self.world.local_rank != 0):
            result = prepare()
        return result

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
