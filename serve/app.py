"""The generative retriever as a Ray Serve application built from one train run directory.

    Ingress (FastAPI, HTTP)  ->  Retriever (the model, N replicas, @serve.batch)
                             ->  Registry  (one replica: the single writer of the store)

The application's state (registered items, users' events and their history clusters) lives in
a store (``recsys.history.store``; ``args.store``), never only in memory. The Registry is its
single writer, whatever the number of model replicas: ``POST /items`` and ``POST /events`` are
committed there (SQLite, fsync'd) before they answer, so a restart loses nothing acknowledged.
Without a store the app registers no items and records no events (422): it could not keep them.

Consistency of ``POST /items``: the Registry embeds the item's content, gives it the next semantic
ID and internal id, and writes the registration to the store and its in-memory log before the
call returns. Every Retriever replica asks the Registry for log entries newer than its own
version before it checks each request, and applies them in one synchronous step (see
``apply_registrations``). So once ``POST /items`` has answered, every later ``/recommend``, on
any replica, can return the item and accept it in a history (read-your-writes, across replicas).
A Registry that restarts replays the store's registrations into its log, in order; the log's
``epoch`` is the store's id, so replicas keep what they applied. A replica that starts later
replays the log. (Should the epoch change, i.e. another store, replicas reload the trained model
and replay the new log.)

``user_id`` in ``/recommend``: a replica reads the user's events from the store (read-only; WAL
readers never block the writer) and puts them before the request's ``history``. An unknown
``user_id`` is a 404: sending the request's items alone would silently recommend from a
different history than the client meant (a mistyped id). A new user either sends no ``user_id``
or records events first. ``user_id`` is the dataset's user id; the model's ``user`` index (TIGER's
user token) is that user's row in the data run, derived from ``user_id`` when the user is in it.

The cascade: given a ranker (a ``recsys rank`` run as ``run_dir``, or ``args.ranker_dir``), the
replica re-ranks the retriever's top ``cascade_top_n`` (default the rank run's N, else 100) by the
ranker, which reads the user's whole history (the stored events, then the request's items, at
most ``ranker_max_history``), and returns the best k with each item's rank in the retriever's
list. The ranker recomputes what it derives from the history (TWIN-V2's clusters, over its own
item vectors, exactly as in training) for each request; the store's ``serve`` clusters are over
content vectors and are not read. A cascade registers new items when its ranker can score them:
a ranker whose item vectors are the content vectors behind the retriever's semantic IDs (a TIGER
or EAGER cascade by default) takes each registered item's content vector, which the Registry's
log carries, and the mean of its trained ID rows (``recsys.models.twin``). Any other cascade
refuses ``POST /items`` (422, saying why), and a store that already holds registrations fails its
start.
``exclude_history`` excludes the retriever's window of the history, as without a ranker.

``retrieval="ann"`` serves the ANN baseline instead (``recsys.ann``: a SASRec user embedding
searched in a faiss index over its item embeddings) behind the same API; it cannot register items.
"""

# No `from __future__ import annotations`: Serve re-creates the ingress methods' signatures, and
# FastAPI then cannot resolve string annotations (a JSON body would be read as a query field).
import asyncio
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from recsys.history.store import Event, EventError, ItemRecord, StoreConfig, open_store
from recsys.models import get_spec
from serve.http import error_body, error_responses, key_digest, make_api, reply
from serve.run import Cascade, open_run, open_serving, user_rows
from serve.schemas import (EventsRequest, EventsResponse, ItemInfo, NewItem, RecommendRequest, RecommendResponse,
                           ServeArgs, UserHistory)
from serve.state import (ItemIds, Query, Registration, Request, RequestError, answer, apply_registrations,
                         check_history, check_k, check_required_inputs, check_times, join_history, user_index,
                         vector_tuple)

log = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 2.0
# On shutdown or redeploy a replica waits for its in-flight requests, checking every this many
# seconds. Serve's default, 2 s, makes every stop take at least 2 s, even for an idle replica.
SHUTDOWN_POLL_S = 0.2


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Registry:
    """The single writer: new items get their semantic ID and internal id here, in log order."""

    def __init__(self, run_dir: str, store: dict | None = None, cascade_refusal: str | None = None,
                 inference: dict | None = None):
        run = open_run(run_dir, inference)
        # a cascade whose ranker cannot score new items: why (``Cascade.registration_refusal``)
        self.run, self.cascade_refusal = run, cascade_refusal
        self.ids = ItemIds(run.items["raw_id"].astype(str).tolist())
        self.log: list[Registration] = []
        self.store = None if store is None else open_store(StoreConfig(**store), run.items["raw_id"].astype(str).tolist())
        # the log's epoch is the store's: a Registry that restarts over the same store keeps it
        self.epoch = uuid.uuid4().hex if self.store is None else self.store.store_id
        # Serve runs sync methods in a thread pool: registrations and reads take turns here.
        self.lock = threading.Lock()
        self.model, self.index, self.encoder = run.load_model(), None, None
        # New items get IDs from their content alone: only the semantic space, for models that
        # register items with semantic IDs only (a behaviour ID needs interactions; EAGER's new
        # items have none until a later behaviour run).
        capabilities = self.model.capabilities
        self.registers = capabilities.registers_items and capabilities.registration_spaces == ("semantic",)
        # The encoder (a sentence-transformers model: seconds to import and load, hundreds of MB held)
        # only where a registration can be kept: without a store the application registers nothing.
        if self.registers and self.store is not None:
            from recsys.semantic_ids import SemanticIdIndex, load_tokenizer
            from recsys.text.encoder import load_encoder

            self.text_cfg, self.enc_cfg = run.exp.embed.text, run.exp.embed.encoder
            self.tokenizer = load_tokenizer(run.ids_dirs["semantic"] / "tokenizer")
            self.index = SemanticIdIndex.load(run.ids_dirs["semantic"] / "index")
            self.vocabulary = self.model.vocabulary("semantic")  # what the model has tokens for
            self.encoder = load_encoder(self.enc_cfg)
        if self.store is not None:
            self._replay()

    def _replay(self) -> None:
        """The store's registrations, in order, into the index, the id map and the log."""
        for record in self.store.registered_items():
            if self.index is None or record.internal_id != len(self.ids) + 1:
                raise RuntimeError(f"store {self.store.path} holds registration {record.version} (internal id "
                                   f"{record.internal_id}) that this application cannot replay; serve the store with "
                                   "the run it was made for")
            full = self.index.add(record.internal_id, record.semantic_id[:-1])
            if full != record.semantic_id:
                raise RuntimeError(f"store {self.store.path}: item {record.raw_id!r} was registered with semantic ID "
                                   f"{list(record.semantic_id)}, but this run's index gives {list(full)}")
            self.ids.add(record.raw_id)
            self.log.append(Registration(record.version, record.internal_id, record.raw_id, record.semantic_id,
                                         record.fields, vector_tuple(record.vector)))

    def ready(self) -> int:
        return len(self.log)

    def since(self, version: int, epoch: str | None) -> tuple[str, list[Registration]]:
        """Log entries after ``version``; the whole log when ``epoch`` is not this log's."""
        with self.lock:
            return self.epoch, list(self.log if epoch != self.epoch else self.log[version:])

    def register(self, raw_id: str | None, fields: dict) -> dict:
        with self.lock:
            try:
                entry = self._register(raw_id, fields)
            except RequestError as err:
                return error_body(err.status, err.message)
        return {"entry": entry}

    def _register(self, raw_id: str | None, fields: dict) -> Registration:
        from recsys.text import build_texts
        from recsys.text.encoder import encode

        if not self.registers:
            raise RequestError(422, f"this application serves a {self.run.exp.model_name} model, which cannot register "
                               "new items from their content alone (a generative retriever that registers them with "
                               "semantic IDs, such as tiger or eager, can)")
        if self.cascade_refusal is not None:
            raise RequestError(422, f"this application serves a cascade that cannot register new items: "
                               f"{self.cascade_refusal}; register them on an application that serves the retriever alone")
        unknown = sorted(set(fields) - set(self.run.content_fields))
        if unknown:
            raise RequestError(422, f"unknown content field(s) {unknown}; allowed: {self.run.content_fields}")
        if self.store is None:
            raise RequestError(422, "this application was started without a store (args.store), so it cannot keep a "
                               "registration it would acknowledge; it registers none")
        internal = len(self.ids) + 1
        raw_id = raw_id if raw_id is not None else f"new-{internal}"
        if raw_id in self.ids:
            raise RequestError(409, f"item id {raw_id!r} is already registered")
        row = pd.DataFrame([{"item_id": internal, "raw_id": raw_id,
                             **{c: fields.get(c) for c in self.run.content_fields}}])
        try:
            text = build_texts(row, self.text_cfg)
        except ValueError as err:
            raise RequestError(422, f"the item's content gives no text to embed: {err}") from None
        vector = encode(self.encoder, text, self.enc_cfg)  # (1, D)
        codes = self.tokenizer.encode(vector)[0]  # (L,)
        full = self.index.next_full_id(codes)
        if not self.vocabulary.fits(full):
            raise RequestError(409, f"semantic ID {list(full)} does not fit the model's vocabulary "
                               f"{self.vocabulary.level_sizes}: its content tuple has no free collision code left")
        # durable first (fsync'd): if the write fails, nothing has changed; after it nothing can fail
        record = self.store.register_item(ItemRecord(internal, raw_id, semantic_id=tuple(int(c) for c in full),
                                                     fields=dict(fields), vector=vector[0]))
        if record.version != len(self.log) + 1:
            raise RuntimeError(f"store {self.store.path} gave registration version {record.version} after "
                               f"{len(self.log)}: another process writes to it")
        self.index.add(internal, codes)
        self.ids.add(raw_id)
        entry = Registration(record.version, internal, raw_id, record.semantic_id, dict(fields),
                             vector_tuple(vector[0]))
        self.log.append(entry)
        return entry

    def append_events(self, user_id: str, events: list[dict]) -> dict:
        """Durably append a user's events (idempotent by event id; the store's checks)."""
        if self.store is None:
            return error_body(422, "this application was started without a store (args.store), so it cannot keep "
                              "events it would acknowledge; it records none")
        now = int(time.time())
        batch = [Event(e["event_id"], e["item"], now if e.get("time") is None else e["time"]) for e in events]
        with self.lock:
            try:
                result = self.store.append_events(user_id, batch)
            except EventError as err:
                return error_body(err.status, err.message)
        return {"user_id": user_id, "appended": result.appended, "duplicates": result.duplicates,
                "history_length": result.history_length, "clusters": self._clusters(user_id)}

    def user_history(self, user_id: str) -> dict:
        if self.store is None:
            return error_body(422, "this application was started without a store (args.store): it keeps no users")
        with self.lock:
            if not self.store.has_user(user_id):
                return error_body(404, f"unknown user_id {user_id!r}: the store has no events for it")
            events = self.store.events(user_id)
            return {"user_id": user_id, "events": [{"event_id": e.event_id, "item": e.item, "time": e.time}
                                                   for e in events], "clusters": self._clusters(user_id)}

    def _clusters(self, user_id: str) -> int | None:
        if self.store.get_meta("history_gamma") is None:
            return None
        return len(self.store.clusters(user_id, "serve").clusters.item)

    def item(self, raw_id: str) -> dict:
        with self.lock:
            if raw_id not in self.ids:
                return error_body(404, f"unknown item id {raw_id!r}")
            internal = self.ids.internal([raw_id])[0]
            if internal <= len(self.run.items):
                row = self.run.items.iloc[internal - 1]
                fields, registered = {c: _plain(row[c]) for c in self.run.content_fields}, False
            else:
                fields, registered = self.log[internal - len(self.run.items) - 1].fields, True
            if registered:
                ids = {"semantic": list(self.index.id_of(internal))}
            else:
                ids = {space: self.model.item_ids(space, torch.tensor([internal]))[0].tolist()
                       for space in self.model.capabilities.id_spaces}
                ids = {space: row for space, row in ids.items() if min(row) >= 0}  # a space it has no ID in
            return {"item": ItemInfo(id=raw_id, internal_id=internal, semantic_id=ids.get("semantic"), ids=ids,
                                     fields=fields,
                                     registered=registered, index_version=len(self.log))}


def _plain(value: Any) -> Any:
    """A parquet cell as JSON: numpy arrays to lists, missing values to None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


@serve.deployment(max_ongoing_requests=32, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Retriever:
    """The model. Requests are checked one by one, then batched (``@serve.batch``) for the model."""

    def __init__(self, run_dir: str, registry: DeploymentHandle, max_k: int, max_history: int | None,
                 max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int, retrieval: str = "model",
                 ann_index: str = "HNSW32", ann_ef_search: int = 128, store: dict | None = None,
                 cascade: dict | None = None, inference: dict | None = None):
        torch.set_num_threads(torch_threads)
        self.run, self.registry, self.max_k = open_run(run_dir, inference), registry, max_k
        self.retrieval, self.ann = retrieval, (ann_index, ann_ef_search)
        # cascade: {ranker_dir, top_n, max_history}; the ranker reads up to max_history events
        self.cascade = None if cascade is None else Cascade(Path(cascade["ranker_dir"]), cascade["top_n"])
        self._load()
        self.top_n, self.window = None, self.model.max_len
        if cascade is not None:
            self.top_n = min(cascade["top_n"], self.model.n_items)
            self.window = max(cascade["max_history"], self.model.max_len)
        self.max_history = min(max_history or self.window, self.window)
        self.uses_users = self.model.users_required
        self.user_rows = user_rows(self.run) if self.uses_users else {}
        # a reader of the store (WAL: it never blocks the Registry, the one writer)
        self.store = None if store is None else open_store(StoreConfig(**store), readonly=True)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _load(self) -> None:
        """The trained state: the checkpoint's model (and a cascade's ranker) and the data run's ids,
        registration log version 0."""
        model = self.run.load_model()
        if self.retrieval == "ann":
            from recsys.faiss_lib import faiss

            from recsys.ann import AnnRetriever

            faiss.omp_set_num_threads(torch.get_num_threads())
            model = AnnRetriever(model, *self.ann)
        self.model = model
        self.ranker = None if self.cascade is None else self.cascade.load_ranker(self.run)
        self.ids = ItemIds(self.run.items["raw_id"].astype(str).tolist())
        self.version, self.epoch = 0, None

    async def _sync(self) -> None:
        epoch, entries = await self.registry.since.remote(self.version, self.epoch)
        if epoch != self.epoch and self.version > 0:
            log.warning("the Registry restarted (epoch %s -> %s) and lost %d registered item(s); reloading the "
                        "trained model", self.epoch, epoch, self.version)
            self._load()
        self.epoch = epoch
        self.version = apply_registrations(self.model, self.ids, self.version, entries, self.ranker)

    async def ready(self) -> int:
        return self.model.n_items

    async def recommend(self, request: dict) -> dict:
        await self._sync()
        timed = self.model.capabilities.reads_timestamps  # other models ignore the times
        k = request["k"]
        try:
            check_history(request["history"], self.max_history)
            check_k(k, self.model.n_items, self.max_k)
            if self.ranker is not None and k > self.top_n:
                raise RequestError(422, f"k={k} is more than the cascade re-ranks: the ranker orders the retriever's "
                                   f"top {self.top_n} (cascade_top_n); allowed: 1 <= k <= {self.top_n}")
            raw, timestamps = request["history"], request.get("timestamps")
            if request.get("user_id") is not None:
                raw, timestamps = self._with_stored(request["user_id"], raw, timestamps, timed)
            internal = self.ids.internal(raw)  # the whole window: what a ranker reads
            long_history = None if self.ranker is None else internal
            history = internal[-self.model.max_len:]  # the retriever's
            timestamps = None if timestamps is None else timestamps[-self.model.max_len:]
            user = user_index(request.get("user_id"), request.get("user"), self.user_rows)
            check_required_inputs(self.model, user, timestamps)
            now = check_times(len(history), timestamps, request.get("time"))
        except RequestError as err:
            return error_body(err.status, err.message)
        query = Query(history, k if self.ranker is None else self.top_n, request["exclude_history"],
                      user if self.uses_users else None, timestamps if timed else None, now if timed else None)
        items, scores, ranks = await self._batched(Request(query, k, long_history))
        spaces = self.model.capabilities.id_spaces
        codes = {space: self.model.item_ids(space, torch.tensor(items)).tolist() for space in spaces}
        return {"items": [{"id": self.ids.raw(i), "internal_id": i, "score": s,
                           "semantic_id": codes["semantic"][row] if "semantic" in codes else None,
                           "ids": {space: codes[space][row] for space in spaces if min(codes[space][row]) >= 0},
                           "retriever_rank": None if ranks is None else ranks[row]}
                          for row, (i, s) in enumerate(zip(items, scores))],
                "catalogue_size": self.model.n_items, "index_version": self.version,
                "replica": serve.get_replica_context().replica_id.unique_id}

    def _with_stored(self, user_id: str, history: list[str], timestamps: list[int] | None,
                     timed: bool) -> tuple[list[str], list[int] | None]:
        """The user's stored events, then the request's history (see ``join_history``)."""
        if self.store is None:
            raise RequestError(422, "user_id needs a store, and this application was started without one "
                               "(args.store); send the history alone")
        try:
            stored = self.store.events(user_id)
        except KeyError:
            raise RequestError(404, f"unknown user_id {user_id!r}: the store has no events for it; send the history "
                               "without user_id, or record the user's events first (POST /events)") from None
        return join_history([e.item for e in stored], [e.time for e in stored], history, timestamps,
                            self.window, timed)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[Request]) -> list[tuple[list[int], list[float], list[int] | None]]:
        return answer(self.model, self.ranker, requests)


def ingress_deployment(api: FastAPI, retries: int) -> serve.Deployment:
    """The HTTP front, defined around ``api`` (``serve.http.make_api``) so that its settings
    travel with it to the replica."""

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                      graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, retriever: DeploymentHandle, registry: DeploymentHandle):
            self.retriever, self.registry = retriever, registry

        @api.get("/healthz", responses=error_responses(503))
        async def healthz(self) -> Any:
            """Ready: the Registry and a model replica answer, not only this HTTP front."""
            try:
                await asyncio.wait_for(self._ping(), HEALTH_TIMEOUT_S)
            except (asyncio.TimeoutError, RayActorError) as err:
                return JSONResponse(error_body(503, f"not ready: the model or the registry did not answer in "
                                               f"{HEALTH_TIMEOUT_S} s ({type(err).__name__})"), status_code=503)
            return {"status": "ok"}

        async def _ping(self) -> None:
            await self.registry.ready.remote()
            await self.retriever.ready.remote()

        @api.post("/recommend", response_model=RecommendResponse,
                  responses=error_responses(400, 401, 404, 413, 422, 503))
        async def recommend(self, body: RecommendRequest) -> Any:
            # A replica that dies mid-request (crash, OOM, node loss) fails the call; a recommendation
            # has no side effect, so it is retried on another replica. X-Retries says how often.
            for attempt in range(retries + 1):
                try:
                    result = await self.retriever.recommend.remote(body.model_dump())
                    break
                except RayActorError as err:
                    log.warning("recommend: replica failed (%s), attempt %d of %d", type(err).__name__,
                                attempt + 1, retries + 1)
                    if attempt == retries:
                        return JSONResponse(error_body(503, f"the model replica failed ({type(err).__name__}) "
                                                       f"{retries + 1} time(s); retry later"), status_code=503)
            if "status" in result:
                return reply(result)
            headers = {"X-Served-By": result.pop("replica"), "X-Retries": str(attempt)}
            return JSONResponse(RecommendResponse(**result).model_dump(), headers=headers)

        @api.post("/items", response_model=ItemInfo, status_code=201,
                  responses=error_responses(400, 401, 409, 413, 422))
        async def register(self, body: NewItem) -> Any:
            result = await self.registry.register.remote(body.id, body.fields)
            if "status" in result:
                return reply(result)
            e: Registration = result["entry"]
            return ItemInfo(id=e.raw_id, internal_id=e.internal_id, semantic_id=list(e.semantic_id),
                            ids={"semantic": list(e.semantic_id)},
                            fields=e.fields, registered=True, index_version=e.version)

        @api.get("/items/{item_id}", response_model=ItemInfo, responses=error_responses(401, 404))
        async def get_item(self, item_id: str) -> Any:
            result = await self.registry.item.remote(item_id)
            return reply(result) if "status" in result else result["item"]

        @api.post("/events", response_model=EventsResponse, responses=error_responses(400, 401, 409, 413, 422, 503))
        async def events(self, body: EventsRequest) -> Any:
            """Append a user's events, durably (written and fsync'd before the answer); a retry with the
            same event ids appends nothing twice. Unknown items, or times before the user's last event,
            refuse the whole batch: nothing is recorded."""
            try:
                result = await self.registry.append_events.remote(body.user_id,
                                                                  [e.model_dump() for e in body.events])
            except RayActorError as err:  # the writer died mid-call: the batch may or may not be in
                return JSONResponse(error_body(503, f"the store's writer failed ({type(err).__name__}); retry with "
                                               "the same event ids: what was recorded is not recorded twice"),
                                    status_code=503)
            return reply(result)

        @api.get("/users/{user_id}", response_model=UserHistory, responses=error_responses(401, 404, 422))
        async def user(self, user_id: str) -> Any:
            """A user's stored events, oldest first, and the number of their virtual items."""
            return reply(await self.registry.user_history.remote(user_id))

    return Ingress


def build_app(args: dict) -> serve.Application:
    """The application from a Serve config's ``args`` (see ``ServeArgs``)."""
    cfg = ServeArgs(**args)
    key_hash = ""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"api_key_env={cfg.api_key_env!r} but that environment variable is unset or empty")
        key_hash = key_digest(key)  # only the hash reaches the replicas
    # fail here, with a clear message, rather than in every replica
    run, cascade = open_serving(cfg.run_dir, cfg.ranker_dir, cfg.cascade_top_n, cfg.inference)
    refusal = None if cascade is None else cascade.registration_refusal(run)
    role = get_spec(run.exp.model_name).model_cls.role
    if role != "retriever":
        raise ValueError(f"{run.run_dir} holds a {role} ({run.exp.model_name}); this application serves a "
                         "retriever, which recommends from the whole catalogue, optionally re-ranked by a ranker: "
                         "give the retriever's run with ranker_dir, or the `recsys rank` run")
    if cfg.retrieval == "ann":
        from recsys.ann import AnnRetriever

        AnnRetriever(run.load_model(), cfg.ann_index, cfg.ann_ef_search)  # refuses models without embeddings
    store = None
    if cfg.store is not None:  # opened (or created, if asked) here: a missing or corrupt store fails the start
        store_cfg = StoreConfig(**cfg.store)
        store_cfg.path = str(Path(store_cfg.path).resolve())
        opened = open_store(store_cfg, run.items["raw_id"].astype(str).tolist())
        registered = len(opened.registered_items())
        opened.close()
        if refusal is not None and registered:
            raise ValueError(f"store {store_cfg.path} holds {registered} registered item(s), which this cascade cannot "
                             f"score: {refusal}; serve it without the ranker, or give the cascade a store without "
                             "registrations")
        store = {**store_cfg.__dict__, "create": False}
    registry = Registry.bind(str(run.run_dir), store, refusal, cfg.inference)
    cascade_args = None if cascade is None else {"ranker_dir": str(cascade.ranker_dir), "top_n": cascade.top_n,
                                                 "max_history": cfg.ranker_max_history}
    scale = ({"autoscaling_config": cfg.autoscaling_config} if cfg.autoscaling_config is not None
             else {"num_replicas": cfg.num_replicas})
    retriever = Retriever.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=max(32, 2 * cfg.max_batch_size), **scale,
    ).bind(str(run.run_dir), registry, cfg.max_k, cfg.max_history, cfg.max_batch_size, cfg.batch_wait_timeout_s,
           cfg.torch_threads, cfg.retrieval, cfg.ann_index, cfg.ann_ef_search, store, cascade_args, cfg.inference)
    api = make_api(key_sha256=key_hash, max_body_bytes=cfg.max_body_bytes)
    return ingress_deployment(api, cfg.replica_failure_retries).bind(retriever, registry)
