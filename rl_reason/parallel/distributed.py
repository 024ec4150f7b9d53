"""Multi-host start-up: who the processes are, and a rendezvous that names the missing.

A run on several hosts is one process per host (JAX's multi-controller model),
all running the same command. Where each process learns the cluster from, first
match wins:

1. the config (`distributed.coordinator_address`, `num_processes`, `process_id`);
2. the variables `launch/local.sh` and the other launchers set
   (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
3. SLURM's (`SLURM_JOB_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID`): the coordinator
   is the first node of the allocation, on `distributed.port`;
4. on a TPU pod slice, `RL_REASON_DISTRIBUTED=1` (what `launch/tpu_pod.sh` sets):
   JAX reads the slice's topology from the TPU VM metadata itself.

`jax.distributed.initialize` waits for every process, and when one never comes
it aborts with "Deadline Exceeded" and no name. So before it, the processes meet
at a small TCP rendezvous beside the coordinator (its port + 1): each says who
it is, and a process that does not arrive within `timeout_seconds` is an error
that names it, on every process that did. After start-up, a process that dies
stops sending heartbeats, and JAX ends the others within
`heartbeat_timeout_seconds`, naming it ("The following tasks are unhealthy").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Optional

import jax
import numpy as np

_log = logging.getLogger(__name__)

DEFAULT_PORT = 8476  # the coordinator's port when only the host is known (SLURM)


class DistributedStartupError(RuntimeError):
    """The processes of a multi-host run did not all meet."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One process's view of the run: None fields are left to JAX (TPU pods)."""

    coordinator_address: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    source: str  # config | environment | slurm | tpu, for the log and errors

    @property
    def rendezvous_address(self) -> Optional[tuple[str, int]]:
        if not self.coordinator_address:
            return None
        host, port = split_address(self.coordinator_address)
        return host, port + 1


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"A coordinator address is host:port; got {address!r}.")
    return host.strip("[]"), int(port)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names, in order:
    "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5 (what `scontrol show
    hostnames` prints, without needing scontrol)."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            for n in range(int(first), int(last) + 1):
                hosts.append(f"{prefix}{n:0{len(first)}d}")
    return hosts


def resolve_cluster(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    port: int = DEFAULT_PORT,
    env: Optional[Mapping[str, str]] = None,
) -> Optional[Cluster]:
    """Who this process is in which cluster (see the module docstring), or None
    for a single-process run."""
    env = os.environ if env is None else env
    if coordinator_address:
        return _complete(coordinator_address, num_processes, process_id, "config")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return _complete(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes or int(env.get("JAX_NUM_PROCESSES", "0")),
            process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1")),
            "environment",
        )
    if env.get("SLURM_JOB_NODELIST") and int(env.get("SLURM_NTASKS", "1")) > 1:
        head = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
        return _complete(
            f"{head}:{port}",
            num_processes or int(env["SLURM_NTASKS"]),
            process_id if process_id >= 0 else int(env["SLURM_PROCID"]),
            "slurm",
        )
    if env.get("RL_REASON_DISTRIBUTED") == "1":
        return Cluster(None, num_processes or None, process_id if process_id >= 0 else None, "tpu")
    return None


def _complete(address: str, num_processes: int, process_id: int, source: str) -> Cluster:
    split_address(address)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"A multi-host run from the {source} needs the number of processes and this"
            f" process's id in [0, number); got num_processes={num_processes},"
            f" process_id={process_id} (coordinator {address})."
        )
    return Cluster(address, num_processes, process_id, source)


def rendezvous(cluster: Cluster, timeout_seconds: float) -> None:
    """Every process checks in with process 0 before JAX's own start-up.

    Process 0 listens beside the coordinator and waits until all have arrived,
    then tells each one; whoever waits longer than `timeout_seconds` raises
    DistributedStartupError naming the processes that did not come (on process 0)
    or the coordinator that did not answer (on the others).
    """
    host, port = cluster.rendezvous_address
    deadline = time.monotonic() + timeout_seconds
    if cluster.process_id == 0:
        _gather(port, cluster.num_processes, deadline, timeout_seconds)
    else:
        _check_in(host, port, cluster.process_id, deadline, timeout_seconds)


def _gather(port: int, num_processes: int, deadline: float, timeout: float) -> None:
    arrived: dict[int, socket.socket] = {}
    hosts = {0: socket.gethostname()}
    with socket.create_server(("", port), reuse_port=False) as server:
        server.settimeout(0.2)
        try:
            while len(arrived) < num_processes - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, num_processes)) - set(arrived))
                    raise DistributedStartupError(
                        f"Processes {missing} of {num_processes} did not arrive within"
                        f" {timeout:g} s (arrived: {sorted(hosts)} on"
                        f" {sorted(set(hosts.values()))}). Check that every host runs the"
                        " same command, and the coordinator address and port they were given."
                    )
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                hello = _read_hello(conn, deadline)
                pid = hello.get("process_id")
                if not isinstance(pid, int) or not 0 < pid < num_processes:
                    _log.warning("The rendezvous ignored a connection that said %r.", hello)
                    conn.close()
                    continue
                if pid in arrived:
                    conn.close()
                    raise DistributedStartupError(
                        f"Two processes of the rendezvous say they are process {pid}"
                        f" ({hosts[pid]} and {hello.get('host', '?')}): give each its own id."
                    )
                arrived[pid], hosts[pid] = conn, hello.get("host", "?")
            for conn in arrived.values():
                conn.sendall(b"go\n")
        finally:
            for conn in arrived.values():
                conn.close()


def _read_hello(conn: socket.socket, deadline: float) -> dict:
    """A process's one-line JSON hello, or {} for anything else (a stray connection
    that says nothing or something else is not one of the run's processes)."""
    try:
        conn.settimeout(max(deadline - time.monotonic(), 0.1))
        hello = json.loads(conn.makefile().readline(4096) or "{}")
    except (OSError, ValueError):
        return {}
    return hello if isinstance(hello, dict) else {}


def _check_in(host: str, port: int, process_id: int, deadline: float, timeout: float) -> None:
    hello = json.dumps({"process_id": process_id, "host": socket.gethostname()}) + "\n"
    while True:
        try:
            remaining = max(deadline - time.monotonic(), 0.1)
            with socket.create_connection((host, port), timeout=remaining) as conn:
                conn.sendall(hello.encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                if conn.makefile().readline().strip() == "go":
                    return
                raise ConnectionError("the rendezvous closed before every process arrived")
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedStartupError(
                    f"Process {process_id}: the coordinator (process 0) at {host}:{port} did not"
                    f" gather every process within {timeout:g} s ({error}). Is process 0"
                    " running, and are the other processes running too?"
                ) from None
            time.sleep(0.2)


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    timeout_seconds: int = 300,
    heartbeat_timeout_seconds: int = 100,
    port: int = DEFAULT_PORT,
) -> bool:
    """Joins the run's other processes when the config or environment says there are
    any (the `distributed` config section's keys); returns whether it did. Calling it
    again in the same process (the study runs several stages) does nothing."""
    cluster = resolve_cluster(coordinator_address, num_processes, process_id, port)
    if cluster is None:
        return False
    if jax.distributed.is_initialized():
        return True
    _log.info("Joining a %s cluster: %s", cluster.source, cluster)
    if cluster.rendezvous_address is not None:
        rendezvous(cluster, timeout_seconds)
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    return True


# --- host work shared across processes ----------------------------------------------
# Work that runs on the host (judging answers, rule-based rewards) is the same on
# every process unless it is split: each process takes an even, contiguous share
# of the items, and the results travel back as JSON so that every process ends
# with all of them, in order (floats survive JSON exactly).


def process_share(num_items: int) -> slice:
    """This process's contiguous share of `num_items` (the first processes take one
    more when they do not divide evenly); on one process, all of them."""
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(num_items, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def gather_lists(local: list) -> list:
    """Every process's `local` list (JSON-serializable items), concatenated in
    process order, on every process."""
    if jax.process_count() == 1:
        return list(local)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local, default=_plain).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    every = multihost_utils.process_allgather(padded)
    return [item for p, size in enumerate(sizes) for item in json.loads(every[p, :size].tobytes())]


def _plain(value):
    """numpy scalars and arrays as the Python values JSON holds (a reward may return them)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot travel between processes as JSON")


def map_shared(fn: Callable[[slice], list], num_items: int) -> list:
    """`fn(share)` computes the results for the items of `share`; each process runs
    it on its own share and every process gets the results of all, in item order.
    Only for host work: a jitted program on a mesh spanning processes needs every
    process to call it on the same inputs."""
    return gather_lists(list(fn(process_share(num_items))))
