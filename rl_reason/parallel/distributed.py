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
that names it, on every process that did. The rendezvous listens on the
coordinator's address only, reads every connection side by side with a few
seconds each for its hello, and admits only hellos carrying the job's token
(RL_REASON_RENDEZVOUS_TOKEN, which the launchers set at random per launch, or
one derived from the SLURM job id); under SLURM the default port is derived
from the job id. JAX's own coordinator (gRPC, on the port itself) has no such
token: on a node shared with strangers, keep the ports firewalled. After start-up, a process that dies
stops sending heartbeats, and JAX ends the others within
`heartbeat_timeout_seconds`, naming it ("The following tasks are unhealthy").
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import selectors
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
    # What every hello must carry (see `job_token`); not shown in logs.
    token: str = dataclasses.field(default="", repr=False)

    @property
    def rendezvous_address(self) -> Optional[tuple[str, int]]:
        if not self.coordinator_address:
            return None
        host, port = split_address(self.coordinator_address)
        return host, port + 1


def job_token(env: Optional[Mapping[str, str]] = None) -> str:
    """The token this job's processes show each other at the rendezvous:
    RL_REASON_RENDEZVOUS_TOKEN (the launchers set a random one per launch), else
    one derived from the SLURM job, else none (any hello without a token is then
    accepted, as before tokens existed)."""
    env = os.environ if env is None else env
    if env.get("RL_REASON_RENDEZVOUS_TOKEN"):
        return env["RL_REASON_RENDEZVOUS_TOKEN"]
    if env.get("SLURM_JOB_ID"):
        job = f"slurm:{env['SLURM_JOB_ID']}:{env.get('SLURM_STEP_ID', '')}"
        return hashlib.sha256(job.encode()).hexdigest()[:32]
    return ""


def job_port(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A coordinator port derived from a job id (an even port in [base, base + span),
    its successor for the rendezvous), so that two jobs sharing a node do not both
    take the fixed default. A numeric id gives what `launch/slurm.sbatch` computes."""
    number = int(job_id) if job_id.isdigit() else int(hashlib.sha256(job_id.encode()).hexdigest(), 16)
    return base + 2 * (number % (span // 2))


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
    token = job_token(env)
    if coordinator_address:
        return _complete(coordinator_address, num_processes, process_id, "config", token)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return _complete(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes or int(env.get("JAX_NUM_PROCESSES", "0")),
            process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1")),
            "environment",
            token,
        )
    if env.get("SLURM_JOB_NODELIST") and int(env.get("SLURM_NTASKS", "1")) > 1:
        head = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
        if port == DEFAULT_PORT and env.get("SLURM_JOB_ID"):
            port = job_port(env["SLURM_JOB_ID"])  # not one fixed port for every job
        if ":" in head:
            head = f"[{head}]"
        return _complete(
            f"{head}:{port}",
            num_processes or int(env["SLURM_NTASKS"]),
            process_id if process_id >= 0 else int(env["SLURM_PROCID"]),
            "slurm",
            token,
        )
    if env.get("RL_REASON_DISTRIBUTED") == "1":
        return Cluster(None, num_processes or None, process_id if process_id >= 0 else None, "tpu")
    return None


def _complete(
    address: str, num_processes: int, process_id: int, source: str, token: str = ""
) -> Cluster:
    split_address(address)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"A multi-host run from the {source} needs the number of processes and this"
            f" process's id in [0, number); got num_processes={num_processes},"
            f" process_id={process_id} (coordinator {address})."
        )
    return Cluster(address, num_processes, process_id, source, token)


# Each connection to the rendezvous has this long to say its hello; connections are
# read side by side, so a silent or slow one delays nobody.
HELLO_TIMEOUT_SECONDS = 5.0
_HELLO_LIMIT = 4096


def rendezvous(cluster: Cluster, timeout_seconds: float) -> None:
    """Every process checks in with process 0 before JAX's own start-up.

    Process 0 listens beside the coordinator, on the coordinator's own interface,
    and waits until all have arrived, then tells each one; whoever waits longer
    than `timeout_seconds` raises DistributedStartupError naming the processes
    that did not come (on process 0) or the coordinator that did not answer (on
    the others). A hello must carry the job's token (`Cluster.token`, from
    RL_REASON_RENDEZVOUS_TOKEN or the SLURM job id) and come within
    HELLO_TIMEOUT_SECONDS; anything else (a stranger, a process of another job on
    the same port, a port scanner) is dropped with a warning and delays nobody.
    """
    host, port = cluster.rendezvous_address
    deadline = time.monotonic() + timeout_seconds
    if cluster.process_id == 0:
        _gather(host, port, cluster.num_processes, cluster.token, deadline, timeout_seconds)
    else:
        _check_in(host, port, cluster.process_id, cluster.token, deadline, timeout_seconds)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the coordinator's own address, so that the rendezvous is
    not offered on every interface of the machine. When the address is not this
    machine's (NAT), or a host name resolves to loopback here only (Debian's
    127.0.1.1 for the own name), all interfaces are used instead, with a warning:
    the job's token still keeps strangers out."""
    literal_loopback = host in ("localhost", "") or _is_loopback(host)
    problems = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        infos, problems = [], [f"{host} does not resolve ({e})"]
    for family, kind, proto, _, address in infos:
        if _is_loopback(address[0]) and not literal_loopback:
            problems.append(f"{host} resolves to loopback {address[0]} here")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            return sock
        except OSError as e:
            problems.append(f"{address[0]}: {e}")
            sock.close()
    _log.warning(
        "The rendezvous could not listen on the coordinator's address only (%s);"
        " listening on all interfaces on port %d.",
        "; ".join(problems),
        port,
    )
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _parse_hello(data: bytes) -> dict:
    """A process's one-line JSON hello, or {} for anything else."""
    line, newline, _ = bytes(data).partition(b"\n")
    if not newline:
        return {}
    try:
        hello = json.loads(line)
    except ValueError:
        return {}
    return hello if isinstance(hello, dict) else {}


def _is_closed(conn: socket.socket) -> bool:
    """Whether the peer of a checked-in connection has gone (it sends nothing more
    until it is told to go, so readable means closed)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        conn.sendall(f"refused: {reason}\n".encode())
    except OSError:
        pass
    conn.close()


def _gather(
    host: str, port: int, num_processes: int, token: str, deadline: float, timeout: float
) -> None:
    arrived: dict[int, socket.socket] = {}
    hosts = {0: socket.gethostname()}
    pending: dict[socket.socket, list] = {}  # conn -> [bytes so far, its deadline, peer]
    with _listen(host, port) as server, selectors.DefaultSelector() as selector:
        server.setblocking(False)
        selector.register(server, selectors.EVENT_READ)
        try:
            while len(arrived) < num_processes - 1:
                now = time.monotonic()
                if now > deadline:
                    missing = sorted(set(range(1, num_processes)) - set(arrived))
                    raise DistributedStartupError(
                        f"Processes {missing} of {num_processes} did not arrive within"
                        f" {timeout:g} s (arrived: {sorted(hosts)} on"
                        f" {sorted(set(hosts.values()))}). Check that every host runs the"
                        " same command, and the coordinator address and port they were given."
                    )
                for conn, (_, until, peer) in list(pending.items()):
                    if now > until:
                        _log.warning(
                            "The rendezvous dropped a connection from %s that sent no hello"
                            " within %g s.", peer, HELLO_TIMEOUT_SECONDS,
                        )
                        selector.unregister(conn)
                        del pending[conn]
                        conn.close()
                for key, _ in selector.select(timeout=0.1):
                    if key.fileobj is server:
                        try:
                            conn, peer = server.accept()
                        except OSError:
                            continue
                        conn.setblocking(False)
                        pending[conn] = [b"", now + HELLO_TIMEOUT_SECONDS, peer]
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    data, _, peer = pending[conn]
                    try:
                        chunk = conn.recv(_HELLO_LIMIT)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    data += chunk
                    pending[conn][0] = data
                    if chunk and b"\n" not in data and len(data) < _HELLO_LIMIT:
                        continue
                    selector.unregister(conn)
                    del pending[conn]
                    _admit(conn, peer, _parse_hello(data), num_processes, token, arrived, hosts)
            for conn in arrived.values():
                conn.setblocking(True)
                conn.settimeout(HELLO_TIMEOUT_SECONDS)
                conn.sendall(b"go\n")
        finally:
            for conn in [*arrived.values(), *pending]:
                conn.close()


def _admit(conn, peer, hello, num_processes, token, arrived, hosts) -> None:
    """Takes a hello's process into `arrived`, or drops the connection saying why."""
    pid = hello.get("process_id")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < num_processes:
        _log.warning("The rendezvous ignored a connection from %s that said %r.", peer, hello)
        _refuse(conn, "not a hello of this run")
        return
    if not hmac.compare_digest(str(hello.get("token", "")).encode(), token.encode()):
        _log.warning(
            "The rendezvous ignored a connection from %s claiming process %d with the wrong"
            " job token (another job on this port, or a stranger).", peer, pid,
        )
        _refuse(conn, "wrong job token")
        return
    if pid in arrived:
        if not _is_closed(arrived[pid]):
            conn.close()
            raise DistributedStartupError(
                f"Two processes of the rendezvous say they are process {pid}"
                f" ({hosts[pid]} and {hello.get('host', '?')}): give each its own id."
            )
        arrived.pop(pid).close()  # the same process, connecting again
    arrived[pid], hosts[pid] = conn, str(hello.get("host", "?"))


def _check_in(
    host: str, port: int, process_id: int, token: str, deadline: float, timeout: float
) -> None:
    hello = json.dumps({"process_id": process_id, "host": socket.gethostname(), "token": token})
    while True:
        try:
            remaining = max(deadline - time.monotonic(), 0.1)
            with socket.create_connection((host, port), timeout=min(remaining, 10)) as conn:
                conn.sendall(hello.encode() + b"\n")
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                reply = conn.makefile().readline(_HELLO_LIMIT).strip()
                if reply == "go":
                    return
                raise ConnectionError(
                    f"the rendezvous {reply}" if reply.startswith("refused")
                    else "the rendezvous closed before every process arrived"
                )
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
