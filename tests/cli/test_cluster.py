"""``jaxdrag run --distributed`` coordination (jaxdrag.cluster): places from flags or a launcher's
environment, and process 0's wait that survives a lost peer (real HTTP on localhost, no JAX)."""

import socket
import time

import pytest

from jaxdrag import cluster


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_place_from_flags_or_the_launchers_environment():
    assert cluster.place("h:1234", 3, 2, env={}) == cluster.Place(2, 3, "h:1234")
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29501"}
    assert cluster.place(None, None, None, env=env) == cluster.Place(1, 4, "node7:29501")
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "JAXDRAG_COORDINATOR": "a:9"}
    assert cluster.place(None, None, None, env=env) == cluster.Place(0, 2, "a:9")
    for args, env, msg in [(("h:1", 2, None), {}, "give all of --coordinator"),
                           ((None, None, None), {}, "no launcher environment"),
                           ((None, None, None), {"RANK": "0", "WORLD_SIZE": "2"}, "set --coordinator host:port"),
                           (("h:1", 2, 2), {}, "--process-id 2 is outside 0..1"),
                           (("nohost", 2, 0), {}, "expected host:port")]:
        with pytest.raises(cluster.ClusterError, match=msg):
            cluster.place(*args, env=env)


def test_process_0_gets_summaries_and_declares_a_silent_peer_lost():
    where = cluster.Place(0, 3, f"localhost:{_port()}")
    coord = cluster.Coordinator(where)
    try:
        p1 = cluster.Peer(cluster.Place(1, 3, where.coordinator), ["b"], interval=0.2)
        p2 = cluster.Peer(cluster.Place(2, 3, where.coordinator), [], interval=0.2)
        p2.finish("c")
        time.sleep(0.6)
        p2.stop.set()  # process 2 dies: no more heartbeats, no summary
        p1.finish("e")
        assert p1.send_summary({"dataset": "d", "method": "m", "done": 2, "failed": {"x": "bad"}, "wall_s": 5.0})
        t0 = time.monotonic()
        got = coord.wait(peer_timeout=1.5, poll=0.1, log=lambda m: None)
        waited = time.monotonic() - t0
    finally:
        coord.close()
    assert 0.8 < waited < 3.0  # bounded by the timeout after its last heartbeat
    assert set(got["summaries"]) == {1} and set(got["lost"]) == {2} and got["lost"][2]["finished"] == ["c"]
    assert got["lost"][2]["silent_s"] >= 1.5  # lost once silent for more than the timeout (rounded to ms)
    names = ["a", "b", "c", "d", "e", "f"]
    mine = {"dataset": "d", "method": "m", "done": 2, "failed": {}, "wall_s": 7.0}
    s = cluster.merge(mine, got, {p: names[p::3] for p in range(3)}, 6)
    assert s["missing"] == ["f"] and "process 2 was lost" in s["missing_why"]["f"]
    assert s["done"] == 2 + 2 + 1 and s["failed"] == {"x": "bad"} and s["wall_s"] == 7.0
    assert s["lost_processes"]["2"]["finished"] == ["c"]


def test_a_peer_without_process_0_gives_up_in_bounded_time():
    p = cluster.Peer(cluster.Place(1, 2, f"localhost:{_port()}"), [], interval=0.2)
    t0 = time.monotonic()
    assert not p.send_summary({"x": 1}, give_up_after=1.0)
    assert time.monotonic() - t0 < 4.0
