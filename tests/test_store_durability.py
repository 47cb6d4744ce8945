"""SIGKILL of the process that owns the store, in the middle of a stream of appends: every append
it acknowledged is there afterwards, none twice, and the clusters moved with the events. The
writer is a plain subprocess appending through the store's interface (tests/test_serve.py kills
the Serve replica that owns the store during a stream of POST /events)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from recsys.history.store import StoreConfig, open_store

CATALOGUE = [f"I{i}" for i in range(1, 31)]
WRITER = textwrap.dedent("""
    import sys
    from recsys.history.store import Event, StoreConfig, open_store

    store = open_store(StoreConfig(path=sys.argv[1]))
    start, stop = int(sys.argv[2]), int(sys.argv[3])
    for i in range(start, stop):
        result = store.append_events("u", [Event(f"e{i}", f"I{1 + i % 30}", i)])
        print(f"ack e{i} {len(result.appended)}", flush=True)
""")


def writer(path, start: int, stop: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start), str(stop)], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd())


def test_sigkill_mid_stream_loses_no_acknowledged_append_and_a_retry_duplicates_none(tmp_path):
    path = tmp_path / "state.sqlite"
    store = open_store(StoreConfig(path=str(path), create=True), CATALOGUE,
                       np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32))
    store.enable_clusters(3, seed=0)  # each append also rewrites the user's clusters: a bigger transaction
    store.close()
    proc = writer(path, 0, 10**6)
    acked = []
    deadline = time.time() + 60
    while len(acked) < 150:  # a stream of acknowledged appends, then the kill lands mid-stream
        line = proc.stdout.readline()
        assert line, "the writer stopped early"
        acked.append(line.split()[1])
        assert time.time() < deadline
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    acked += [line.split()[1] for line in proc.stdout.read().splitlines()]  # printed before it died
    assert proc.returncode == -signal.SIGKILL

    store = open_store(StoreConfig(path=str(path)))  # opens: the store is whole
    ids = [e.event_id for e in store.events("u")]
    store.close()
    assert ids[:len(acked)] == acked  # every acknowledged append, in order
    assert len(ids) <= len(acked) + 1  # at most the one committed while its ack was being printed
    # the client retries from its first unacknowledged event: nothing is appended twice
    retry = writer(path, len(acked), len(acked) + 5)
    out = retry.communicate(timeout=60)[0].split("\n")
    assert retry.returncode == 0
    appended = [int(line.split()[2]) for line in out if line]
    assert appended == [0 if len(ids) > len(acked) else 1] + [1] * 4
    store = open_store(StoreConfig(path=str(path)), readonly=True)
    events = store.events("u")
    assert [e.event_id for e in events] == [f"e{i}" for i in range(len(acked) + 5)]
    assert [e.position for e in events] == list(range(len(events)))
    served = store.clusters("u", "serve")
    assert served.cutoff == len(events) and served.clusters.size.sum() == len(events)
    assert (served.clusters.size <= 3).all()
    store.close()
