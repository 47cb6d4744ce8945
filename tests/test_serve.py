"""The Ray Serve app over real HTTP, built from tiny runs trained here (a TIGER pipeline, and a
SASRec on the same data for the ANN baseline): answers, batching that stays exact, every kind
of bad input, the API key, and items registered while traffic flows over two replicas.

The tests run in file order on one app: those that register items come after those that rely
on the trained catalogue of 60 items."""

import copy
import importlib
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml
from ray import serve

from conftest import TIGER_PIPELINE_ITEMS as N_ITEMS
from pipelines.cli import main
from recsys.models import Batch
from recsys.runs import read_json

pytestmark = pytest.mark.ray

KEY_ENV, KEY = "RECSYS_TEST_SERVE_KEY", "test-key-7f3a"
MAX_HISTORY, MAX_BODY, GAMMA = 8, 4096, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(ray_session, tiger_pipeline) -> dict[str, Path]:
    """The session's tiny TIGER pipeline (conftest.tiger_pipeline) and a SASRec trained on its data
    run -> their train directories. TIGER scores the collision token by content, so an item
    registered with the content of an existing one ties with it (see the twin test)."""
    root = tiger_pipeline["root"]
    assert main(["train", f"run.root={root}", "model.name=sasrec", "model.d_model=16", "model.n_layers=1",
                 "model.d_ff=32", "trainer.optim.epochs=1", "trainer.optim.batch_size=128", "trainer.resources.use_ray=false",
                 "--data", read_json(tiger_pipeline["tiger"] / "config.json")["data_dir"]]) == 0
    (sasrec,) = (root / "train").iterdir()
    return {**tiger_pipeline, "sasrec": sasrec}


def lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
        except OSError:
            return None


def check_ann_baseline(url: str, runs, raw_ids) -> None:
    """The ANN baseline (SASRec + an exact faiss index, no store) answers as SASRec does in process,
    and refuses what needs a store or a registering model."""
    from recsys.training.checkpoint import load_model

    sasrec = load_model(runs["sasrec"] / "checkpoints" / "best")
    r = post(url, "/recommend", {"history": [raw_ids[i] for i in (4, 8)], "k": 7, "exclude_history": True}, key=None)
    assert r.status_code == 200, r.text
    expected = sasrec.recommend(Batch(history=torch.tensor([[4, 8]])), 7, exclude_history=True)
    assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()  # Flat index: exact
    assert [it["score"] for it in r.json()["items"]] == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
    assert all(it["semantic_id"] is None and it["ids"] == {} for it in r.json()["items"])
    r = post(url, "/items", {"fields": {"title": "x"}}, key=None)
    assert r.status_code == 422 and "cannot register new items" in r.json()["error"]
    r = post(url, "/events", {"user_id": "u1", "events": [{"event_id": "a", "item": raw_ids[3]}]}, key=None)
    assert r.status_code == 422 and "started without a store" in r.json()["error"]  # it could not keep them
    r = post(url, "/recommend", {"history": [raw_ids[3]], "user_id": "u1"}, key=None)
    assert r.status_code == 422 and "user_id needs a store" in r.json()["error"]
    assert get(url, f"/items/{raw_ids[3]}", key=None).json()["semantic_id"] is None
    r = post(url, "/recommend", {"history": ["NOPE"], "k": 3}, key=None)
    assert r.status_code == 422 and "'NOPE'" in r.json()["error"]


# Runs before any test that starts the module's app (fixtures start on first use): Serve is one per
# Ray cluster, and the CLI's Ctrl-C shuts it down.
def test_recsys_serve_answers_on_localhost_only_and_stops_on_ctrl_c(ray_session, runs, raw_ids):
    """`recsys serve` joins the cluster that RAY_ADDRESS names, here the tests' own Ray instance, as it
    joins a cluster a user started. Starting its own instance instead cost 31 s against 14 s on a
    2-core machine; that branch of ``init_ray`` is checked by its arguments in test_demo.py. It serves
    the ANN baseline (no sentence encoder to load), whose answers are checked here too
    (``check_ann_baseline``): one start of that app for both."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(runs["sasrec"]), "--ann",
                             "--ann-index", "Flat", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches
    try:
        line = proc.stdout.readline()  # printed once the app is ready
        assert line.startswith(f"serving {runs['sasrec']} at http://127.0.0.1:{port} "), \
            line + proc.stderr.read() if proc.poll() is not None else line
        check_ann_baseline(f"http://127.0.0.1:{port}", runs, raw_ids)
        lan = lan_address()
        if lan is not None and not lan.startswith("127."):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{lan}:{port}/healthz", timeout=5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # never leave it running: the module's apps share its Serve
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted: shutting Serve down" in err


def test_serve_refuses_options_that_need_another_option_before_any_work(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--ann-index", "Flat"]) == 2
    assert "--ann-index sets the faiss index of the ANN baseline: give --ann too" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--create-store"]) == 2
    assert "--create-store needs --store PATH" in capsys.readouterr().err


def test_serve_config_yaml_is_valid_for_ray_serve_and_builds_the_app(runs, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app
    from serve.run import open_run

    path = Path(__file__).resolve().parent.parent / "serve" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    module, name = app.import_path.split(":")
    assert getattr(importlib.import_module(module), name) is build_app
    monkeypatch.delenv(app.args["api_key_env"], raising=False)
    with pytest.raises(ValueError, match=f"api_key_env='{app.args['api_key_env']}' but that environment variable"):
        build_app({**app.args, "run_dir": str(runs["tiger"])})
    monkeypatch.setenv(app.args["api_key_env"], "k")
    with pytest.raises(FileNotFoundError, match="RUN-ID"):  # the placeholder must be replaced
        build_app(app.args)
    assert isinstance(build_app({**app.args, "run_dir": str(runs["tiger"])}), serve.Application)
    assert open_run(runs["tiger"].parent).run_dir == runs["tiger"]  # a pipeline run serves its train stage


class FakeRegistry:
    """Stands in for the Registry's handle in a replica built without Serve: ``since.remote``."""

    def __init__(self, epoch: str):
        self.epoch, self.log = epoch, []
        self.since = self

    def remote(self, version: int, epoch: str | None):
        async def answer():
            return self.epoch, list(self.log if epoch != self.epoch else self.log[version:])
        return answer()


def test_a_replica_drops_registrations_a_restarted_registry_no_longer_has(runs, model):
    """The Registry's log is in memory: after its restart (a new epoch, an empty log) a replica that
    had applied registrations reloads the trained model, so every replica agrees with the Registry."""
    import asyncio

    from serve.app import Retriever
    from serve.state import Registration

    registry = FakeRegistry("epoch-1")
    replica = Retriever.func_or_class(str(runs["tiger"]), registry, 100, None, 8, 0.01, 1)
    codes = model.item_codes[1].tolist()[:-1] + [model.level_sizes[-1] - 1]  # item 1's content, a free collision code
    assert codes not in model.item_codes.tolist()
    registry.log = [Registration(1, N_ITEMS + 1, "R-NEW", tuple(codes), {})]
    asyncio.run(replica._sync())
    assert (replica.model.n_items, replica.version, "R-NEW" in replica.ids) == (N_ITEMS + 1, 1, True)
    registry.epoch, registry.log = "epoch-2", []  # restarted: the registration is gone
    asyncio.run(replica._sync())
    assert (replica.model.n_items, replica.version, "R-NEW" in replica.ids) == (N_ITEMS, 0, False)
    assert replica.model.item_codes.tolist() == model.item_codes.tolist()
    registry.log = [Registration(1, N_ITEMS + 1, "R-OTHER", tuple(codes), {})]  # the new log replays
    asyncio.run(replica._sync())
    assert (replica.model.n_items, replica.ids.raw(N_ITEMS + 1)) == (N_ITEMS + 1, "R-OTHER")


def test_a_registry_without_a_store_loads_no_encoder_and_registers_nothing(runs):
    """Without a store an application keeps no registration, so it takes none, and its Registry
    never loads the sentence encoder (seconds to import, hundreds of MB held by the replica)."""
    from serve.app import Registry

    registry = Registry.func_or_class(str(runs["tiger"]))
    assert registry.registers and registry.encoder is None
    refused = registry.register("R-NEW", {"title": "a new item"})
    assert refused["status"] == 422 and "started without a store" in refused["error"]
    assert "R-NEW" not in registry.ids and registry.log == []


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:  # the proxy answers 404 until the replicas are up
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, f"the Serve app at {url} did not come up in {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def store_path(runs, tmp_path_factory) -> Path:
    """The store `recsys history` makes from the TIGER pipeline's data and embed runs: every user's
    events and clusters (gamma = GAMMA); the app registers items and records events into it."""
    path = tmp_path_factory.mktemp("state") / "state.sqlite"
    assert main(["history", f"run.root={path.parent / 'runs'}", f"history.gamma={GAMMA}", "history.use_ray=false",
                 f"store.path={path}", "--data", str(runs["data"]), "--embed", str(runs["embed"])]) == 0
    return path


def tiger_args(runs, store_path) -> dict:
    return {"run_dir": str(runs["tiger"]), "num_replicas": 2, "replica_cpus": 0.25, "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02, "max_history": MAX_HISTORY, "max_body_bytes": MAX_BODY,
            "api_key_env": KEY_ENV, "store": {"path": str(store_path)}}


@pytest.fixture(scope="module")
def serve_urls(runs, store_path):
    """The TIGER retriever at / (2 replicas, API key, the store); other tests add apps under other
    prefixes. (The ANN baseline is checked on the app `recsys serve` starts, before this one.)"""
    from ray import serve

    from serve.app import build_app

    os.environ[KEY_ENV] = KEY
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    serve.run(build_app(tiger_args(runs, store_path)), name="retriever", route_prefix="/", blocking=False)
    wait_ready(url)
    yield {"tiger": url}
    serve.shutdown()
    os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def server(serve_urls) -> str:
    return serve_urls["tiger"]


@pytest.fixture(scope="module")
def model(runs):
    from recsys.training.checkpoint import load_model

    return load_model(runs["tiger"] / "checkpoints" / "best")


@pytest.fixture(scope="module")
def raw_ids(runs):
    import pandas as pd

    items = pd.read_parquet(Path(read_json(runs["tiger"] / "config.json")["data_dir"]) / "items.parquet")
    return dict(zip(items["item_id"].astype(int), items["raw_id"].astype(str)))


def post(url: str, path: str, body, key: str | None = KEY, session=requests) -> requests.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return session.post(f"{url}{path}", data=data, headers={**headers, "Content-Type": "application/json"},
                        timeout=30)


def get(url: str, path: str, key: str | None = KEY) -> requests.Response:
    return requests.get(f"{url}{path}", headers={"X-API-Key": key} if key is not None else {}, timeout=10)


def test_recommend_answers_with_dataset_ids_scores_and_semantic_ids(server, model, raw_ids):
    history = [raw_ids[i] for i in (3, 7, 9)]
    r = post(server, "/recommend", {"history": history, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = model.recommend(Batch(history=torch.tensor([[3, 7, 9]])), 5)
    assert [it["internal_id"] for it in body["items"]] == expected.items[0].tolist()
    assert [it["id"] for it in body["items"]] == [raw_ids[i] for i in expected.items[0].tolist()]
    assert [it["score"] for it in body["items"]] == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
    assert [it["semantic_id"] for it in body["items"]] == model.item_codes[expected.items[0]].tolist()
    assert [it["ids"] for it in body["items"]] == [{"semantic": c} for c in model.item_codes[expected.items[0]].tolist()]
    assert body["catalogue_size"] == N_ITEMS and body["index_version"] == 0
    assert r.headers["X-Served-By"] and r.headers["X-Retries"] == "0"
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200  # OpenAPI, no key needed
    spec = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert {"/recommend", "/items", "/items/{item_id}", "/events", "/users/{user_id}", "/healthz"} <= set(spec["paths"])


def test_concurrent_requests_with_different_k_and_exclusion_are_answered_exactly(server, model, raw_ids):
    cases = [([1 + (i * 7) % 60, 1 + (i * 13) % 60, 1 + (i * 5) % 60][: 1 + i % 3], [1, 4, 10, 15][i % 4], i % 2 == 1)
             for i in range(16)]

    def ask(case):
        history, k, exclude = case
        return post(server, "/recommend", {"history": [raw_ids[i] for i in history], "k": k,
                                           "exclude_history": exclude})

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, cases))
    for (history, k, exclude), r in zip(cases, replies):
        assert r.status_code == 200, r.text
        got = [it["internal_id"] for it in r.json()["items"]]
        alone = model.recommend(Batch(history=torch.tensor([history])), k, exclude_history=exclude)
        assert got == alone.items[0].tolist()
        if exclude:
            assert not set(got) & set(history)


BAD = [
    ("unknown id", {"history": ["SYN000001", "NOPE-1"], "k": 5}, 422, "unknown item id(s) in history: 'NOPE-1'"),
    ("empty history", {"history": [], "k": 5}, 422, "history: List should have at least 1 item"),
    ("k zero", {"history": ["SYN000001"], "k": 0}, 422, "body.k: Input should be greater than or equal to 1"),
    ("k over catalogue", {"history": ["SYN000001"], "k": 61}, 422, "k=61 is out of range; allowed: 1 <= k <= 60"),
    ("history too long", {"history": ["SYN000001"] * (MAX_HISTORY + 1), "k": 5}, 422,
     f"more than the limit of {MAX_HISTORY}"),
    ("k as string", {"history": ["SYN000001"], "k": "5"}, 422, "body.k: Input should be a valid integer"),
    ("k as float", {"history": ["SYN000001"], "k": 5.5}, 422, "body.k: Input should be a valid integer"),
    ("ids as ints", {"history": [1, 2], "k": 5}, 422, "body.history.0: Input should be a valid string"),
    ("history as string", {"history": "SYN000001", "k": 5}, 422, "body.history: Input should be a valid list"),
    ("exclude as string", {"history": ["SYN000001"], "exclude_history": "yes"}, 422, "body.exclude_history"),
    ("history missing", {"k": 5}, 422, "body.history: Field required"),
    ("unknown key", {"history": ["SYN000001"], "kk": 5}, 422, "body.kk: Extra inputs are not permitted"),
    ("negative user", {"history": ["SYN000001"], "user": -1}, 422, "body.user"),
    ("not an object", [1, 2], 422, "invalid request"),
    ("malformed JSON", b'{"history": ["SYN000001"', 400, "malformed JSON body"),
    ("empty body", b"", 422, "invalid request"),
    ("oversized", {"history": ["x" * (MAX_BODY + 10)]}, 413, f"exceeds the limit of {MAX_BODY}"),
]


@pytest.mark.parametrize("name,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_json_error_that_says_what_is_wrong(server, name, body, status, message):
    r = post(server, "/recommend", body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["status"] == status and message in r.json()["error"]


# Two statuses beyond schemathesis' defaults, each a documented answer: a body the schema admits can
# still name items this catalogue does not hold (422, which names them), and any body over the
# server's max_body_bytes is refused before it is parsed (413), also a schema-valid one (a batch of
# 1000 events is over this test's 4096 bytes). Every check runs.
SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "413", "422"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


def test_the_api_document_matches_the_api_under_fuzzing(server, tmp_path):
    """schemathesis, every check, over every operation of the running endpoint's OpenAPI document:
    no failure and no server error (``docs/experiments/serving.md`` has a run's counts)."""
    import subprocess
    import sys

    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    out = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         f"{server}/openapi.json", "--checks", "all", "-H", f"X-API-Key: {KEY}", "--max-examples", "25",
         "--seed", "0", "--workers", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = out.stdout[-3000:]
    print(summary)  # with -s: the counts docs/experiments/serving.md quotes
    assert out.returncode == 0, summary
    assert "5xx" not in summary and "Server error" not in summary, summary
    assert re.search(r"(\d+) passed", summary), summary


def test_unknown_routes_and_methods_get_json_errors_and_nothing_is_lost(server):
    r = get(server, "/nowhere")
    assert r.status_code == 404 and r.json()["error"] == "Not Found"
    r = get(server, "/recommend")
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed"
    assert post(server, "/recommend", {"history": ["SYN000001"], "k": 3}).status_code == 200


def test_chunked_oversized_body_is_refused_and_the_server_keeps_answering(server):
    chunks = (b"x" * 1024 for _ in range(MAX_BODY // 1024 + 2))  # no content-length: chunked
    r = requests.post(f"{server}/recommend", data=chunks, headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    assert post(server, "/recommend", {"history": ["SYN000001"], "k": 3}).status_code == 200  # nothing lost


def test_api_key_is_required_except_for_health_and_docs(server):
    body = {"history": ["SYN000001"], "k": 3}
    for key in (None, "", "wrong", KEY + "x"):
        r = post(server, "/recommend", body, key=key)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
    assert get(server, "/items/SYN000001", key=None).status_code == 401
    assert post(server, "/items", {"fields": {"title": "x"}}, key="wrong").status_code == 401
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    assert post(server, "/recommend", body).status_code == 200


def test_item_lookup_gives_content_and_semantic_id(server, model, raw_ids):
    r = get(server, f"/items/{raw_ids[2]}")
    assert r.status_code == 200, r.text
    item = r.json()
    assert item["internal_id"] == 2 and not item["registered"] and item["fields"]["title"]
    assert item["semantic_id"] == model.item_codes[2].tolist() and item["ids"] == {"semantic": item["semantic_id"]}
    r = get(server, "/items/NO-SUCH-ITEM")
    assert r.status_code == 404 and "unknown item id 'NO-SUCH-ITEM'" in r.json()["error"]


@pytest.fixture(scope="module")
def sequences(runs) -> dict[str, list[int]]:
    import pandas as pd

    seqs = pd.read_parquet(runs["data"] / "sequences.parquet")
    return dict(zip(seqs["user_id"].astype(str), seqs["item_ids"].map(lambda s: [int(i) for i in s])))


def test_events_are_recorded_once_and_a_user_id_brings_the_stored_history(server, model, raw_ids, sequences,
                                                                          store_path):
    from recsys.history.store import StoreConfig, open_store

    events = [{"event_id": "n1-a", "item": raw_ids[3], "time": 100}, {"event_id": "n1-b", "item": raw_ids[7]}]
    r = post(server, "/events", {"user_id": "NEW-USER-1", "events": events})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": "NEW-USER-1", "appended": ["n1-a", "n1-b"], "duplicates": [], "history_length": 2,
                        "clusters": 1}
    retry = post(server, "/events", {"user_id": "NEW-USER-1", "events": events})
    assert retry.status_code == 200 and retry.json()["appended"] == [] and retry.json()["duplicates"] == ["n1-a", "n1-b"]
    stored = get(server, "/users/NEW-USER-1").json()
    assert [(e["event_id"], e["item"]) for e in stored["events"]] == [("n1-a", raw_ids[3]), ("n1-b", raw_ids[7])]
    assert stored["events"][0]["time"] == 100 and stored["events"][1]["time"] >= 100  # default: the server's now
    # user_id: the stored events come first, the request's history after them
    r = post(server, "/recommend", {"history": [raw_ids[9]], "user_id": "NEW-USER-1", "k": 5})
    assert r.status_code == 200, r.text
    expected = model.recommend(Batch(history=torch.tensor([[3, 7, 9]])), 5)
    assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()
    # a user of the training data: the whole stored history, of which the model reads its last max_len
    user, seq = max(sequences.items(), key=lambda kv: len(kv[1]))
    assert len(seq) + 1 > model.max_len
    r = post(server, "/recommend", {"history": [raw_ids[1]], "user_id": user, "k": 5})
    expected = model.recommend(Batch(history=torch.tensor([(seq + [1])[-model.max_len:]])), 5)
    assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()
    # the user's clusters follow every append (one transaction with the events)
    for i in range(4):
        r = post(server, "/events", {"user_id": user, "events": [{"event_id": f"{user}-live-{i}", "item": raw_ids[2 + i]}]})
        assert r.status_code == 200 and r.json()["history_length"] == len(seq) + i + 1, r.text
    store = open_store(StoreConfig(path=str(store_path)), readonly=True)
    served = store.clusters(user, "serve")
    assert served.cutoff == len(seq) + 4 and (served.clusters.size <= GAMMA).all()
    assert len(served.clusters.item) == r.json()["clusters"]
    assert store.clusters(user, "test").cutoff == len(seq) - 1  # the offline examples' sets do not move
    store.close()


def test_bad_events_and_unknown_users_are_4xx_and_record_nothing(server, raw_ids):
    before = get(server, "/users/NEW-USER-1").json()["events"]
    cases = [([{"event_id": "n1-c", "item": raw_ids[1], "time": 200}, {"event_id": "n1-d", "item": "NOPE"}], 422,
              "unknown item id(s) in events: 'NOPE'"),
             ([{"event_id": "n1-c", "item": raw_ids[1], "time": 50}], 422, "before the user's last event time"),
             ([{"event_id": "n1-a", "item": raw_ids[4]}], 409, "event id 'n1-a' is already recorded"),
             ([{"event_id": "n1-c", "item": raw_ids[1]}] * 2, 422, "appear more than once in one batch"),
             ([], 422, "body.events"), ([{"event_id": "", "item": raw_ids[1]}], 422, "body.events.0.event_id"),
             ([{"event_id": "x", "item": raw_ids[1], "time": -1}], 422, "body.events.0.time")]
    for events, status, message in cases:
        r = post(server, "/events", {"user_id": "NEW-USER-1", "events": events})
        assert r.status_code == status and message in r.json()["error"], (events, r.text)
    assert post(server, "/events", {"user_id": "OTHER", "events": [{"event_id": "n1-a", "item": raw_ids[3]}]}
                ).status_code == 409  # event ids are unique across users
    assert get(server, "/users/NEW-USER-1").json()["events"] == before
    r = get(server, "/users/OTHER")
    assert r.status_code == 404 and "unknown user_id 'OTHER'" in r.json()["error"]
    r = post(server, "/recommend", {"history": [raw_ids[1]], "user_id": "NO-SUCH-USER", "k": 3})
    assert r.status_code == 404 and "unknown user_id 'NO-SUCH-USER'" in r.json()["error"]


def test_item_registered_with_an_items_content_is_recommended_beside_it(server, model, raw_ids):
    """A new item with the content of the top recommendation gets its content codes and a fresh
    collision code. With collision_scoring=content it must score exactly as that item does, so
    it is returned right beside it: the registration reached the trie of the replica that answers."""
    history = [raw_ids[i] for i in (3, 7, 9)]
    top = post(server, "/recommend", {"history": history, "k": 1}).json()["items"][0]
    fields = get(server, f"/items/{top['id']}").json()["fields"]
    r = post(server, "/items", {"id": "TWIN-1", "fields": fields})
    assert r.status_code == 201, r.text
    twin = r.json()
    assert twin["internal_id"] == N_ITEMS + 1 and twin["registered"] and twin["index_version"] == 1
    assert twin["semantic_id"][:-1] == top["semantic_id"][:-1] and twin["semantic_id"] != top["semantic_id"]
    assert get(server, "/items/TWIN-1").json()["semantic_id"] == twin["semantic_id"]
    for _ in range(4):  # both replicas, right after the POST returned
        r = post(server, "/recommend", {"history": history, "k": 10})
        assert r.status_code == 200, r.text
        scores = {it["id"]: it["score"] for it in r.json()["items"]}
        assert "TWIN-1" in scores and scores["TWIN-1"] == pytest.approx(scores[top["id"]], abs=1e-5)
        assert r.json()["catalogue_size"] == N_ITEMS + 1
    # the served ranking is the model's own after the same registration
    local = copy.deepcopy(model)
    local.register_items([N_ITEMS + 1], {"semantic": [twin["semantic_id"]]})
    expected = local.recommend(Batch(history=torch.tensor([[3, 7, 9]])), 10)
    assert sorted(scores.values(), reverse=True) == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
    # the new item is usable in a history, and exclusion keeps it out of the answer
    r = post(server, "/recommend", {"history": [*history, "TWIN-1"], "k": 10, "exclude_history": True})
    assert r.status_code == 200, r.text
    assert not {"TWIN-1", *history} & {it["id"] for it in r.json()["items"]}


def test_registrations_under_traffic_are_seen_by_every_replica_at_once(server, raw_ids):
    """Readers keep /recommend busy while items are registered. Right after each POST returns,
    the new id is sent in histories until both replicas have answered (a replica that had not
    applied it would say 422 unknown id). Every reader's answer is whole (catalogue size and
    index version agree) and no older than the last registration that returned before it was sent."""
    first = post(server, "/recommend", {"history": [raw_ids[5]], "k": 3}).json()
    base = first["catalogue_size"] - first["index_version"]
    assert base == N_ITEMS
    stop, seen, errors = threading.Event(), [], []

    def reader() -> None:
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            r = post(server, "/recommend", {"history": [raw_ids[5], raw_ids[9]], "k": 5}, session=session)
            if r.status_code != 200:
                errors.append(r.text)
                continue
            body = r.json()
            seen.append((sent, r.headers["X-Served-By"], body["index_version"], body["catalogue_size"]))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    registered, checked_on = [], set()
    try:
        for i in range(5):
            r = post(server, "/items", {"id": f"LIVE-{i}", "fields": {"title": f"Live registered item number {i}"}})
            assert r.status_code == 201, r.text
            registered.append((time.monotonic(), r.json()["index_version"]))
            replicas = set()
            for _ in range(10):
                with ThreadPoolExecutor(4) as pool:
                    replies = list(pool.map(lambda _: post(server, "/recommend",
                                                           {"history": [f"LIVE-{i}"], "k": 3}), range(4)))
                for rr in replies:
                    assert rr.status_code == 200, f"LIVE-{i} unknown right after its POST returned: {rr.text}"
                    assert rr.json()["index_version"] >= registered[-1][1]
                    replicas.add(rr.headers["X-Served-By"])
                if len(replicas) == 2:
                    break
            assert len(replicas) == 2, f"LIVE-{i} was only checked on replica(s) {replicas}"
            checked_on |= replicas
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
    assert len(seen) >= 20, f"only {len(seen)} reader answers: the traffic did not flow during registrations"
    assert {s[1] for s in seen} == checked_on  # the readers' traffic reached both replicas too
    for sent, _, version, catalogue in seen:
        assert catalogue - version == base  # never an item without its version or the reverse
        required = max((v for done, v in registered if done < sent), default=0)
        assert version >= required  # read-your-writes across replicas
    assert [v for _, v in registered] == list(range(registered[0][1], registered[0][1] + 5))  # none lost


def test_bad_registrations_are_4xx_and_add_nothing(server, raw_ids):
    before = post(server, "/recommend", {"history": [raw_ids[1]], "k": 1}).json()["catalogue_size"]
    cases = [({"id": raw_ids[1], "fields": {"title": "dup"}}, 409, "already registered"),
             ({"id": "TWIN-1", "fields": {"title": "dup"}}, 409, "already registered"),
             ({"fields": {"colour": "red"}}, 422, "unknown content field(s) ['colour']"),
             ({"fields": {"title": None}}, 422, "gives no text to embed"),
             ({"fields": {"title": 5}}, 422, "invalid request"),
             ({"fields": "a title"}, 422, "invalid request"),
             ({"id": "", "fields": {"title": "x"}}, 422, "body.id"),
             (b'{"fields": {', 400, "malformed JSON body")]
    for body, status, message in cases:
        r = post(server, "/items", body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"], r.text
    assert post(server, "/recommend", {"history": [raw_ids[1]], "k": 1}).json()["catalogue_size"] == before
    # an unnamed item gets an id from the server
    r = post(server, "/items", {"fields": {"title": "another new thing"}})
    assert r.status_code == 201 and r.json()["id"] == f"new-{before + 1}"


@pytest.fixture(scope="module")
def cascade_runs(runs, tmp_path_factory) -> dict[str, Path]:
    """A cascade on the TIGER pipeline's data: a SASRec trained with the ranker's transition held
    out, TWIN-V2 trained on its top 20 by `recsys rank`, and a store of its own."""
    root = tmp_path_factory.mktemp("cascade")
    data_dir = read_json(runs["tiger"] / "config.json")["data_dir"]
    assert main(["train", f"run.root={root}", "model.name=sasrec", "model.d_model=16", "model.n_layers=1",
                 "model.d_ff=32", "trainer.optim.epochs=1", "trainer.optim.batch_size=128",
                 "trainer.resources.use_ray=false", "trainer.data.ranker_holdout=true", "--data", data_dir]) == 0
    (retriever,) = (root / "train").iterdir()
    assert main(["rank", f"run.root={root}", "trainer.resources.use_ray=false", "model.name=twin_v2",
                 f"model.gamma={GAMMA}", "model.d_model=16", "model.random_negatives=5", "trainer.optim.epochs=2",
                 "trainer.optim.batch_size=64", "trainer.selection.patience=0", "--top-n", "20",
                 "--retriever", str(retriever)]) == 0
    (rank,) = (root / "rank").iterdir()
    store = root / "state.sqlite"
    assert main(["history", f"run.root={root / 'runs'}", f"history.gamma={GAMMA}", "history.use_ray=false",
                 f"store.path={store}", "--data", str(runs["data"]), "--embed", str(runs["embed"])]) == 0
    return {"retriever": retriever, "rank": rank, "ranker": Path(read_json(rank / "config.json")["train_dir"]),
            "store": store}


def test_a_cascade_reranks_the_retrievers_top_n_over_the_users_whole_history(serve_urls, cascade_runs, raw_ids,
                                                                             sequences):
    from recsys.cascade import rerank
    from recsys.training.checkpoint import load_model
    from serve.app import build_app

    retriever = load_model(cascade_runs["retriever"] / "checkpoints" / "best")
    ranker = load_model(cascade_runs["ranker"] / "checkpoints" / "best")

    def expected(whole: list[int], k: int):
        top = retriever.recommend(Batch(history=torch.tensor([whole[-retriever.max_len:]])), 20)
        return rerank(ranker, [whole], [top.items[0].tolist()], [top.scores[0].tolist()], [k])[0]

    app = build_app({"run_dir": str(cascade_runs["rank"]), "num_replicas": 1, "replica_cpus": 0.25,
                     "store": {"path": str(cascade_runs["store"])}})
    serve.run(app, name="cascade", route_prefix="/cascade", blocking=False)
    url = f"{serve_urls['tiger']}/cascade"
    wait_ready(url)
    try:
        r = post(url, "/recommend", {"history": [raw_ids[i] for i in (3, 7, 9)], "k": 5}, key=None)
        assert r.status_code == 200, r.text
        want = expected([3, 7, 9], 5)
        items = r.json()["items"]
        assert [it["internal_id"] for it in items] == want.items
        assert [it["retriever_rank"] for it in items] == want.retriever_ranks
        assert [it["score"] for it in items] == pytest.approx(want.scores, abs=1e-4)
        # a stored user: the ranker reads the whole stored history and the request's item, the
        # retriever its last max_len of them
        user, seq = max(sequences.items(), key=lambda kv: len(kv[1]))
        assert len(seq) + 1 > retriever.max_len
        r = post(url, "/recommend", {"history": [raw_ids[1]], "user_id": user, "k": 20}, key=None)
        assert [it["internal_id"] for it in r.json()["items"]] == expected(seq + [1], 20).items
        # an event recorded through the cascade reaches the ranker's history at once
        r = post(url, "/events", {"user_id": user, "events": [{"event_id": "cascade-1", "item": raw_ids[4]}]}, key=None)
        assert r.status_code == 200 and r.json()["history_length"] == len(seq) + 1, r.text
        r = post(url, "/recommend", {"history": [raw_ids[1]], "user_id": user, "k": 20}, key=None)
        assert [it["internal_id"] for it in r.json()["items"]] == expected(seq + [4, 1], 20).items
        # what a cascade refuses
        r = post(url, "/recommend", {"history": [raw_ids[3]], "k": 21}, key=None)
        assert r.status_code == 422 and "cascade_top_n" in r.json()["error"], r.text
        r = post(url, "/items", {"fields": {"title": "x"}}, key=None)
        assert r.status_code == 422 and "serves a sasrec model, which cannot register" in r.json()["error"]
    finally:
        serve.delete("cascade")


def test_a_cascade_that_cannot_work_fails_the_start(cascade_runs, tmp_path):
    import shutil

    from serve.app import build_app

    with pytest.raises(ValueError, match="is a rank run, which names its ranker"):
        build_app({"run_dir": str(cascade_runs["rank"]), "ranker_dir": str(cascade_runs["ranker"])})
    with pytest.raises(ValueError, match="cascade_top_n=5 but there is no ranker"):
        build_app({"run_dir": str(cascade_runs["retriever"]), "cascade_top_n": 5})
    with pytest.raises(ValueError, match="holds a ranker .twin_v2.; this application serves a retriever"):
        build_app({"run_dir": str(cascade_runs["ranker"])})
    # a store that holds a registered item: no ranker knows it
    from recsys.history.store import ItemRecord, StoreConfig, open_store

    registered = tmp_path / "registered.sqlite"
    shutil.copy(cascade_runs["store"], registered)
    store = open_store(StoreConfig(path=str(registered)))
    store.register_item(ItemRecord(N_ITEMS + 1, "REGISTERED-1", semantic_id=(0, 0), fields={"title": "x"}))
    store.close()
    with pytest.raises(ValueError, match=r"holds 1 registered item\(s\), which this cascade cannot score"):
        build_app({"run_dir": str(cascade_runs["rank"]), "store": {"path": str(registered)}})
    # a ranker trained on another catalogue
    assert main(["data", f"run.root={tmp_path}", "data.synthetic.n_users=50", "data.synthetic.n_items=30"]) == 0
    (other,) = (tmp_path / "data").iterdir()
    moved = tmp_path / "ranker"
    shutil.copytree(cascade_runs["ranker"], moved)
    config = read_json(moved / "config.json")
    (moved / "config.json").write_text(json.dumps({**config, "data_dir": str(other)}))
    with pytest.raises(ValueError, match="were trained on different catalogues"):
        build_app({"run_dir": str(cascade_runs["retriever"]), "ranker_dir": str(moved)})
    assert isinstance(build_app({"run_dir": str(cascade_runs["retriever"]), "ranker_dir": str(cascade_runs["ranker"]),
                                 "cascade_top_n": 10}), serve.Application)


def test_a_time_aware_hstu_is_served_and_reads_the_requests_times(serve_urls, runs, raw_ids, tmp_path):
    """HSTU with rab^{p,t} (time_bias=on) on the synthetic data's timestamps, over HTTP: the answer
    is the model's own for the request's timestamps and query time, and the time changes it."""
    from recsys.training.checkpoint import load_model
    from serve.app import build_app

    data_dir = read_json(runs["tiger"] / "config.json")["data_dir"]
    assert main(["train", f"run.root={tmp_path}", "model.name=hstu", "model.d_model=16", "model.n_heads=1",
                 "model.time_bias=on", "model.loss=ce", "model.dropout=0", "model.emb_dropout=0",
                 "trainer.optim.epochs=1", "trainer.optim.batch_size=64", "trainer.resources.use_ray=false",
                 "--data", data_dir]) == 0
    (run,) = (tmp_path / "train").iterdir()
    hstu = load_model(run / "checkpoints" / "best").eval()
    # the TIGER app holds 1 of the session's 2 CPUs; each app these tests add takes 0.75 and is deleted after
    serve.run(build_app({"run_dir": str(run), "num_replicas": 1, "replica_cpus": 0.25}), name="hstu",
              route_prefix="/hstu", blocking=False)
    url = f"{serve_urls['tiger']}/hstu"
    wait_ready(url)
    try:
        history, times = [3, 7, 9], [1_500_000_000, 1_500_000_600, 1_500_086_400]
        answers = []
        for when in (1_500_090_000, 1_520_000_000):
            r = post(url, "/recommend", {"history": [raw_ids[i] for i in history], "timestamps": times, "time": when,
                                         "k": 5}, key=None)
            assert r.status_code == 200, r.text
            expected = hstu.recommend(Batch(history=torch.tensor([history]), timestamps=torch.tensor([times]),
                                            target_time=torch.tensor([when])), 5)
            assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()
            assert [it["score"] for it in r.json()["items"]] == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
            answers.append([it["score"] for it in r.json()["items"]])
        assert answers[0] != pytest.approx(answers[1], abs=1e-6)  # the request's time is the query time
        r = post(url, "/recommend", {"history": [raw_ids[3]], "k": 5}, key=None)
        assert r.status_code == 422 and "give `timestamps`" in r.json()["error"]
        r = post(url, "/recommend", {"history": [raw_ids[3], raw_ids[4]], "timestamps": [5, 4], "k": 5}, key=None)
        assert r.status_code == 422 and "timestamps decrease at position 1" in r.json()["error"]
    finally:
        serve.delete("hstu")


@pytest.fixture(scope="module")
def eager_run(runs) -> Path:
    """A tiny EAGER on the TIGER pipeline's data: content IDs from its ids run, behaviour IDs
    from the SASRec run's item table."""
    root = runs["tiger"].parent.parent.parent  # runs/pipeline/<id>/train -> runs
    assert main(["ids", f"run.root={root}", "ids.method=hkmeans", "ids.use_ray=false", "ids.hkmeans.branching=6",
                 "--from-train", str(runs["sasrec"])]) == 0
    (behavior,) = (root / "ids").iterdir()
    assert main(["train", f"run.root={root}", "run.name=eager", "model.name=eager", "model.d_model=16",
                 "model.n_heads=2", "model.n_decoder_layers=1", "model.d_ff=32", "model.beam_size=10",
                 "trainer.data.samples=prefixes", "trainer.optim.epochs=1", "trainer.optim.batch_size=128",
                 "trainer.resources.use_ray=false", "--data", str(runs["data"]),
                 "--ids", f"behavior={behavior}", "--ids", f"semantic={runs['tiger'].parent / 'ids'}"]) == 0
    return next((root / "train").glob("*-eager"))


def test_an_eager_run_registers_an_item_from_content_alone_and_reads_it_in_a_history(serve_urls, eager_run, raw_ids,
                                                                                      tmp_path):
    """POST /items on an EAGER run: the new item gets semantic codes only (no behaviour yet), the
    served answers are the model's own after the same registration, and a history holding the new
    item is read by its semantic code tokens."""
    from recsys.training.checkpoint import load_model
    from serve.app import build_app

    url = serve_urls["tiger"].removesuffix("/") + "/eager"
    serve.run(build_app({"run_dir": str(eager_run), "num_replicas": 1, "replica_cpus": 0.25,
                         "store": {"path": str(tmp_path / "eager.sqlite"), "create": True}}), name="eager", route_prefix="/eager",
              blocking=False)
    try:
        wait_ready(url)
        history = [raw_ids[i] for i in (2, 5, 11)]
        top = post(url, "/recommend", {"history": history, "k": 1}, key=None).json()["items"][0]
        fields = get(url, f"/items/{top['id']}", key=None).json()["fields"]
        r = post(url, "/items", {"id": "EAGER-NEW", "fields": fields}, key=None)
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["internal_id"] == N_ITEMS + 1 and new["semantic_id"][:-1] == top["semantic_id"][:-1]
        model = load_model(eager_run / "checkpoints" / "best")
        model.register_items([N_ITEMS + 1], {"semantic": [new["semantic_id"]]})
        for ids, names in (([2, 5, 11], history), ([2, 5, 11, N_ITEMS + 1], [*history, "EAGER-NEW"])):
            r = post(url, "/recommend", {"history": names, "k": 10}, key=None)
            assert r.status_code == 200, r.text
            expected = model.recommend(Batch(history=torch.tensor([ids])), 10)
            assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()
            assert [it["score"] for it in r.json()["items"]] == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
    finally:
        serve.delete("eager")


def test_an_eager_run_serves_one_stream_alone_when_its_inference_settings_say_so(serve_urls, eager_run, raw_ids):
    """``inference: {fusion: behavior}`` serves the behaviour stream alone (the per-stream rows of the
    serving benchmark); a setting that would change what the weights mean fails the build, before
    any replica starts."""
    from recsys.training.checkpoint import load_model
    from serve.app import build_app

    with pytest.raises(ValueError, match=r"inference: \['d_model'\] cannot change once model.name='eager' is trained"):
        build_app({"run_dir": str(eager_run), "inference": {"d_model": 8}})
    url = serve_urls["tiger"].removesuffix("/") + "/eager-behaviour"
    serve.run(build_app({"run_dir": str(eager_run), "num_replicas": 1, "replica_cpus": 0.25,
                         "inference": {"fusion": "behavior"}}), name="eager-behaviour", route_prefix="/eager-behaviour",
              blocking=False)
    try:
        wait_ready(url)
        fused, alone = load_model(eager_run / "checkpoints" / "best"), load_model(
            eager_run / "checkpoints" / "best", inference={"fusion": "behavior"})
        ids = [2, 5, 11]
        r = post(url, "/recommend", {"history": [raw_ids[i] for i in ids], "k": 10}, key=None)
        assert r.status_code == 200, r.text
        expected = alone.recommend(Batch(history=torch.tensor([ids])), 10)
        assert [it["internal_id"] for it in r.json()["items"]] == expected.items[0].tolist()
        assert [it["score"] for it in r.json()["items"]] == pytest.approx(expected.scores[0].tolist(), abs=1e-4)
        both = fused.recommend(Batch(history=torch.tensor([ids])), 10)  # sum: both streams' log-probabilities
        assert not torch.allclose(both.scores, expected.scores)
    finally:
        serve.delete("eager-behaviour")


def test_a_tiger_cascade_registers_items_its_ranker_scores_by_their_content_vectors(serve_urls, runs, tiger_cascade,
                                                                                    raw_ids, tmp_path):
    """A cascade whose ranker's item vectors are the content vectors behind the retriever's semantic
    IDs takes POST /items: the Registry's log carries the item's content vector, the replica's
    ranker scores the item by it (and reads it in a history), and the answers are the in-process
    retriever and ranker's after the same registrations. The application starts over a store that
    already holds a registration, made by the Registry of an earlier life of the same cascade: the
    start replays it, vector included (one start instead of two; a restart through Serve is
    test_a_restarted_application_keeps_everything_it_acknowledged's). A cascade whose ranker has other
    vectors refuses, and cannot start on that store."""
    import shutil

    import numpy as np

    from recsys.cascade import rerank
    from recsys.history.store import StoreConfig, open_store
    from recsys.text.store import load_embeddings
    from recsys.training.checkpoint import load_model
    from serve.app import Registry, build_app
    from serve.run import Cascade, open_run

    rank = tiger_cascade["rank"]
    config = read_json(rank / "config.json")
    assert Cascade(Path(config["train_dir"]), config["top_n"]).registration_refusal(open_run(runs["tiger"])) is None
    store = tmp_path / "cascade.sqlite"
    # the earlier life: its Registry (the store's one writer) registers an item with item 2's content
    earlier = Registry.func_or_class(config["retriever_dir"], {"path": str(store), "create": True})
    old = earlier.register("CASCADE-OLD", earlier.item(raw_ids[2])["item"].fields)["entry"]
    earlier.store.close()
    assert old.internal_id == N_ITEMS + 1
    url = serve_urls["tiger"].removesuffix("/") + "/tiger-cascade"

    def answer(names: list[str], k: int) -> list[tuple[int, float]]:
        r = post(url, "/recommend", {"history": names, "k": k}, key=None)
        assert r.status_code == 200, r.text
        return [(it["internal_id"], it["score"]) for it in r.json()["items"]]

    serve.run(build_app({"run_dir": str(rank), "num_replicas": 1, "replica_cpus": 0.25, "store": {"path": str(store)}}),
              name="tiger-cascade", route_prefix="/tiger-cascade", blocking=False)
    try:
        wait_ready(url)
        replayed = get(url, "/items/CASCADE-OLD", key=None).json()
        assert (replayed["registered"], replayed["semantic_id"]) == (True, list(old.semantic_id))
        history = [raw_ids[i] for i in (2, 5, 11)]
        top = post(url, "/recommend", {"history": history, "k": 1}, key=None).json()["items"][0]
        fields = get(url, f"/items/{top['id']}", key=None).json()["fields"]
        r = post(url, "/items", {"id": "CASCADE-NEW", "fields": fields}, key=None)
        assert r.status_code == 201, r.text
        new = r.json()
        assert (new["internal_id"], new["index_version"]) == (N_ITEMS + 2, 2)
        opened = open_store(StoreConfig(path=str(store)), readonly=True)
        vectors = opened.item_vectors([N_ITEMS + 1, N_ITEMS + 2])
        opened.close()
        # the same encoder as the ranker's vectors: an item with the same content has the same vector
        embedded = load_embeddings(runs["embed"])[1]
        for vector, like in zip(vectors, (embedded[1], embedded[top["internal_id"] - 1])):
            assert float(vector @ like / np.linalg.norm(vector) / np.linalg.norm(like)) > 0.999
        retriever = load_model(Path(config["retriever_dir"]) / "checkpoints" / "best")
        retriever.register_items([N_ITEMS + 1, N_ITEMS + 2], {"semantic": [list(old.semantic_id), new["semantic_id"]]})
        ranker = load_model(Path(config["train_dir"]) / "checkpoints" / "best")
        ranker.register_items(torch.tensor([N_ITEMS + 1, N_ITEMS + 2]), torch.from_numpy(vectors))
        asked = {}
        for ids, names in (([2, 5, 11], history), ([2, 5, 11, N_ITEMS + 1], [*history, "CASCADE-OLD"]),
                           ([2, 5, 11, N_ITEMS + 2], [*history, "CASCADE-NEW"])):
            listed = retriever.recommend(Batch(history=torch.tensor([ids])), config["top_n"])
            want = rerank(ranker, [ids], [listed.items[0].tolist()], [listed.scores[0].tolist()], [config["top_n"]])[0]
            asked[tuple(names)] = answer(names, config["top_n"])
            assert [i for i, _ in asked[tuple(names)]] == want.items
            assert [s for _, s in asked[tuple(names)]] == pytest.approx(want.scores, abs=1e-4)
        assert N_ITEMS + 2 in [i for i, _ in asked[tuple(history)]]  # the ranker scored the new item
    finally:
        serve.delete("tiger-cascade")
    # a ranker whose vectors are not the content vectors a registered item gets
    other = tmp_path / "ranker-other-vectors"
    shutil.copytree(config["train_dir"], other)
    saved = read_json(other / "config.json")
    (other / "config.json").write_text(json.dumps({**saved, "item_vectors_dir": str(config["retriever_dir"])}))
    refusal = Cascade(other, 20).registration_refusal(open_run(runs["tiger"]))
    assert refusal is not None and "--vectors-from" in refusal
    with pytest.raises(ValueError, match=r"holds 2 registered item\(s\), which this cascade cannot score: its ranker"):
        build_app({"run_dir": str(runs["tiger"]), "ranker_dir": str(other), "store": {"path": str(store)}})


def test_sigkill_of_the_store_writer_during_a_stream_of_events_loses_and_duplicates_nothing(server, raw_ids):
    """A client streams POST /events, one event per call, retrying each (same event id) until it is
    acknowledged. The Registry replica, the one process that owns the store, is killed with SIGKILL
    mid-stream; Serve starts another, which reopens the store. The user's stored events are then
    exactly the acknowledged ones, in order, none lost and none twice."""
    import ray
    from ray.util.state import list_actors

    acked, failures, stop = [], [], threading.Event()

    def client() -> None:
        session, i = requests.Session(), 0
        while not stop.is_set():
            body = {"user_id": "STREAM", "events": [{"event_id": f"s-{i}", "item": raw_ids[1 + i % N_ITEMS]}]}
            try:
                r = post(server, "/events", body, session=session)
            except requests.RequestException as err:
                failures.append(type(err).__name__)
                continue
            if r.status_code != 200:
                failures.append(r.status_code)
                time.sleep(0.1)
                continue
            acked.append(f"s-{i}")
            i += 1

    def wait_for(n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while len(acked) < n:
            assert time.time() < deadline, f"only {len(acked)} events acknowledged; failures {failures[-5:]}"
            time.sleep(0.05)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_for(20, 60)
        (writer,) = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,  # this session's Ray
                                filters=[("class_name", "=", "ServeReplica:retriever:Registry"), ("state", "=", "ALIVE")])
        os.kill(writer.pid, signal.SIGKILL)
        at_kill = len(acked)
        wait_for(at_kill + 20, 180)  # the stream goes on with the new writer
        (new_writer,) = list_actors(address=ray.get_runtime_context().gcs_address, detail=True, filters=[
            ("class_name", "=", "ServeReplica:retriever:Registry"), ("state", "=", "ALIVE")])
    finally:
        stop.set()
        thread.join()
    # The call in flight when the writer died either failed (503 or a dropped connection: the client
    # retried it) or was retried by Serve on the new replica; either way the store's idempotency
    # by event id is what keeps it from being recorded twice.
    assert new_writer.pid != writer.pid and at_kill >= 20
    stored = [e["event_id"] for e in get(server, "/users/STREAM").json()["events"]]
    assert stored == acked


def test_a_restarted_application_keeps_everything_it_acknowledged(serve_urls, runs, store_path, raw_ids, sequences):
    """Runs last: the app is deleted and started again over the same store. Every registered item
    (these tests registered them, each acknowledged with a 201) and every recorded event is back,
    with the same ids and versions, and answers are the same as before."""
    from recsys.history.store import StoreConfig, open_store
    from serve.app import build_app

    server = serve_urls["tiger"]
    store = open_store(StoreConfig(path=str(store_path)), readonly=True)
    registered = [r.raw_id for r in store.registered_items()]
    store.close()
    assert {"TWIN-1", *(f"LIVE-{i}" for i in range(5))} <= set(registered)
    items = {raw: get(server, f"/items/{raw}").json() for raw in registered}
    user = max(sequences, key=lambda u: len(sequences[u]))
    users = {u: get(server, f"/users/{u}").json() for u in ("NEW-USER-1", user)}
    question = {"history": ["TWIN-1", "LIVE-3"], "user_id": "NEW-USER-1", "k": 10}
    before = post(server, "/recommend", question).json()

    serve.delete("retriever")
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 404  # gone
    # one model replica: what survives is the store's, whatever the replica count (a start costs ~6 s of CPU each)
    serve.run(build_app({**tiger_args(runs, store_path), "num_replicas": 1}), name="retriever", route_prefix="/",
              blocking=False)
    wait_ready(server)

    assert {raw: get(server, f"/items/{raw}").json() for raw in registered} == items
    assert {u: get(server, f"/users/{u}").json() for u in users} == users
    after = post(server, "/recommend", question).json()
    assert [it["id"] for it in after["items"]] == [it["id"] for it in before["items"]]
    assert [it["score"] for it in after["items"]] == pytest.approx([it["score"] for it in before["items"]], abs=1e-5)
    assert (after["index_version"], after["catalogue_size"]) == (len(registered), N_ITEMS + len(registered))
    r = post(server, "/items", {"id": "AFTER-RESTART", "fields": {"title": "registered after the restart"}})
    assert r.status_code == 201 and r.json()["index_version"] == len(registered) + 1
    assert r.json()["internal_id"] == N_ITEMS + len(registered) + 1


def test_a_missing_or_corrupt_store_fails_the_start_with_a_clear_error(runs, store_path, tmp_path):
    from recsys.history.store import StoreError
    from serve.app import build_app

    args = {**tiger_args(runs, store_path), "api_key_env": None}
    with pytest.raises(StoreError, match="does not exist; create it with `recsys history`"):
        build_app({**args, "store": {"path": str(tmp_path / "missing.sqlite")}})
    (tmp_path / "bad.sqlite").write_bytes(b"not a database" * 200)
    with pytest.raises(StoreError, match="is not a readable store"):
        build_app({**args, "store": {"path": str(tmp_path / "bad.sqlite")}})
    with pytest.raises(ValueError, match="store has unknown key"):
        build_app({**args, "store": {"path": str(store_path), "file": "x"}})
    build_app({**args, "store": {"path": str(tmp_path / "new.sqlite"), "create": True}})  # explicit: made, empty
    assert (tmp_path / "new.sqlite").is_file()
