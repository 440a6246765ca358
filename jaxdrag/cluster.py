"""Several processes splitting one ``jaxdrag run`` (``--distributed``), surviving a lost peer.

Every process takes every n-th sample and edits on its own devices, so the processes need each
other only for the summary. They talk over a small HTTP service that process 0 runs on the
coordinator address: each peer posts a heartbeat every ``HEARTBEAT_S`` seconds (from a thread,
so compiling or a long batch does not silence it) with the samples it has finished, and its
summary at the end. Process 0, once its own share is done, waits for every peer's summary — but
a peer whose heartbeats stop for ``peer_timeout`` seconds (killed, hung, its host gone) is
declared lost: process 0 writes the summary of what finished, naming the lost peer's samples
that did not, and the run exits with status 1. A rerun of the same command completes them (each
process skips the samples whose results exist).

This deliberately does not use ``jax.distributed``: its coordination service terminates every
process when one stops sending heartbeats, which is exactly the case to survive.

Process index, count and coordinator come from the flags, or from the environment of common
launchers: SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``), Open MPI (``OMPI_COMM_WORLD_RANK`` /
``_SIZE``), MPICH/PMI (``PMI_RANK``, ``PMI_SIZE``) or torchrun-style ``RANK``/``WORLD_SIZE``;
the coordinator from ``JAXDRAG_COORDINATOR`` or ``MASTER_ADDR``:``MASTER_PORT``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

HEARTBEAT_S = 2.0
PEER_TIMEOUT_S = 120.0

_RANKS = (("SLURM_PROCID", "SLURM_NTASKS"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
          ("PMI_RANK", "PMI_SIZE"), ("RANK", "WORLD_SIZE"))


class ClusterError(ValueError):
    """A bad cluster setting (one line naming it)."""


@dataclass(frozen=True)
class Place:
    """This process's place: index ``pid`` of ``nproc``, coordinator ``host:port``."""

    pid: int
    nproc: int
    coordinator: str


def place(coordinator: str | None, num_processes: int | None, process_id: int | None,
          env: dict | None = None) -> Place:
    """The flags, or else the launcher's environment (see the module docstring)."""
    env = os.environ if env is None else env
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ClusterError("--distributed: give all of --coordinator, --num-processes and --process-id, "
                           "or none (read from the launcher's environment)")
    if coordinator is None:
        for r, n in _RANKS:
            if r in env and n in env:
                process_id, num_processes = int(env[r]), int(env[n])
                break
        else:
            raise ClusterError("--distributed: no --coordinator/--num-processes/--process-id and no launcher "
                               "environment (SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK or RANK) found")
        coordinator = env.get("JAXDRAG_COORDINATOR") or (
            f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}" if "MASTER_ADDR" in env else None)
        if coordinator is None:
            raise ClusterError("--distributed: set --coordinator host:port (or JAXDRAG_COORDINATOR, or "
                               "MASTER_ADDR and MASTER_PORT) to the address of process 0")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ClusterError(f"--process-id {process_id} is outside 0..{num_processes - 1}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--coordinator {coordinator!r}: expected host:port")
    return Place(process_id, num_processes, coordinator)


# ----------------------------------------------------------------------------------------------
# process 0


@dataclass
class _Peers:
    start: float
    seen: dict = field(default_factory=dict)       # pid → time of the last heartbeat
    finished: dict = field(default_factory=dict)   # pid → names reported finished
    summaries: dict = field(default_factory=dict)  # pid → final summary
    lock: threading.Lock = field(default_factory=threading.Lock)


class Coordinator:
    """Process 0's service: records peers' heartbeats and summaries (``serve`` starts it)."""

    def __init__(self, place: Place, clock: Callable[[], float] = time.monotonic):
        self.place, self.clock = place, clock
        self.peers = _Peers(start=clock())
        peers, clk = self.peers, clock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                pid = int(body.get("pid", -1))
                with peers.lock:
                    peers.seen[pid] = clk()
                    peers.finished.setdefault(pid, set()).update(body.get("finished", []))
                    if self.path == "/summary":
                        peers.summaries[pid] = body["summary"]
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):  # quiet
                pass

        host, _, port = place.coordinator.rpartition(":")
        bind = "" if host not in ("localhost", "127.0.0.1") else host
        try:
            self.server = ThreadingHTTPServer((bind, int(port)), Handler)
        except OSError as e:
            raise ClusterError(f"--coordinator {place.coordinator}: cannot listen on port {port} ({e})") from None
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, peer_timeout: float, poll: float = 0.5, log: Callable[[str], None] = print) -> dict:
        """Wait until every peer has sent its summary or is lost (no heartbeat for
        ``peer_timeout`` s; a peer never heard from counts from process 0's start). Returns
        {"summaries": {pid: summary}, "lost": {pid: {"silent_s", "finished"}}, "waited_s"}."""
        t0 = self.clock()
        peers = range(1, self.place.nproc)
        while True:
            now = self.clock()
            with self.peers.lock:
                pending = [p for p in peers if p not in self.peers.summaries]
                silent = {p: now - self.peers.seen.get(p, self.peers.start) for p in pending}
            lost = [p for p in pending if silent[p] > peer_timeout]
            if len(lost) == len(pending):
                break
            time.sleep(poll)
        if lost:
            log(f"process 0: lost process(es) {', '.join(map(str, lost))}: no heartbeat for "
                f"{', '.join(f'{silent[p]:.0f} s' for p in lost)} (--peer-timeout {peer_timeout:g})")
        with self.peers.lock:
            return {"summaries": dict(self.peers.summaries),
                    "lost": {p: {"silent_s": round(silent[p], 3), "finished": sorted(self.peers.finished.get(p, ()))}
                             for p in lost},
                    "waited_s": round(self.clock() - t0, 1)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------
# the other processes


def _post(coordinator: str, path: str, body: dict, timeout: float = 10.0) -> None:
    req = urllib.request.Request(f"http://{coordinator}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


class Peer:
    """A peer's side: heartbeats from a thread (``finish(name)`` adds a finished sample to the
    next one), and ``send_summary`` at the end."""

    def __init__(self, place: Place, finished: list[str] = (), interval: float = HEARTBEAT_S):
        self.place, self.interval = place, interval
        self.finished = set(finished)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def finish(self, name: str) -> None:
        """Record a finished sample; the heartbeat thread reports it at once."""
        with self.lock:
            self.finished.add(name)
        self.wake.set()

    def _body(self) -> dict:
        with self.lock:
            return {"pid": self.place.pid, "finished": sorted(self.finished)}

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                _post(self.place.coordinator, "/heartbeat", self._body(), timeout=self.interval * 2)
            except (OSError, urllib.error.URLError):
                pass  # process 0 not up yet, or gone: keep working, the summary step tells
            self.wake.wait(self.interval)
            self.wake.clear()

    def send_summary(self, summary: dict, give_up_after: float = PEER_TIMEOUT_S) -> bool:
        """Post the summary (retrying for ``give_up_after`` s); False if process 0 never took it."""
        self.stop.set()
        self.wake.set()
        t0 = time.monotonic()
        while True:
            try:
                _post(self.place.coordinator, "/summary", {**self._body(), "summary": summary})
                return True
            except (OSError, urllib.error.URLError):
                if time.monotonic() - t0 > give_up_after:
                    return False
                time.sleep(1.0)


def merge(mine: dict, gathered: dict, shares: dict[int, list[str]], n_all: int,
          on_disk: Callable[[str], bool] = lambda name: False) -> dict:
    """Process 0's summary of the whole run: its own and every peer's summary; for a lost peer,
    its samples neither reported finished nor ``on_disk`` (a result in the shared output
    folder: a peer killed between writing a result and its next heartbeat) are listed under
    ``missing``."""
    parts = [mine] + [gathered["summaries"][p] for p in sorted(gathered["summaries"])]
    lost = {p: {**info, "finished": sorted(set(info["finished"]) | {n for n in shares[p] if on_disk(n)})}
            for p, info in gathered["lost"].items()}
    missing = {name: f"process {p} was lost (no heartbeat for {info['silent_s']:.0f} s)"
               for p, info in lost.items() for name in shares[p] if name not in set(info["finished"])}
    lost_done = sum(len(set(info["finished"]) & set(shares[p])) for p, info in lost.items())
    return {"dataset": mine["dataset"], "method": mine["method"], "total": n_all,
            "done": sum(p["done"] for p in parts) + lost_done,
            "failed": {k: v for p in parts for k, v in p["failed"].items()},
            "missing": sorted(missing), "missing_why": missing,
            "lost_processes": {str(p): info for p, info in lost.items()},
            "waited_for_peers_s": gathered["waited_s"],
            "processes": parts, "wall_s": max(p["wall_s"] for p in parts)}
