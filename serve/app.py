"""The generative retriever as a Ray Serve application built from one train run directory.

    Ingress (FastAPI, HTTP)  ->  Retriever (the model, N replicas, @serve.batch)
                             ->  Registry  (one replica: the single writer of new items)

Consistency of ``POST /items``: the Registry is the only writer. It embeds the item's content,
gives it the next semantic ID and internal id, and appends the registration to a versioned log
before the call returns. Every Retriever replica asks the Registry for log entries newer than
its own version before it checks each request, and applies them in one synchronous step (see
``apply_registrations``). So once ``POST /items`` has answered, every later ``/recommend``, on
any replica, can return the item and accept it in a history (read-your-writes, across replicas).
A replica that starts later replays the log. The log lives in the Registry's memory: a restart
of the Registry forgets registered items, and replicas that had applied them reload the trained
model so that all replicas agree again (the Registry's ``epoch`` tells them).

``retrieval="ann"`` serves the ANN baseline instead (``recsys.ann``: a SASRec user embedding
searched in a faiss index over its item embeddings) behind the same API; it cannot register items.
"""

# No `from __future__ import annotations`: Serve re-creates the ingress methods' signatures, and
# FastAPI then cannot resolve string annotations (a JSON body would be read as a query field).
import asyncio
import logging
import os
import threading
import uuid
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from recsys.models import get_spec
from serve.http import error_body, error_responses, key_digest, make_api, reply
from serve.run import open_run
from serve.schemas import ItemInfo, NewItem, RecommendRequest, RecommendResponse, ServeArgs
from serve.state import (ItemIds, Query, Registration, RequestError, apply_registrations, check_history, check_k,
                         check_required_inputs, check_times, run_queries)

log = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 2.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Registry:
    """The single writer: new items get their semantic ID and internal id here, in log order."""

    def __init__(self, run_dir: str):
        run = open_run(run_dir)
        self.run, self.epoch = run, uuid.uuid4().hex  # a new epoch = a fresh log (see Retriever._sync)
        self.ids = ItemIds(run.items["raw_id"].astype(str).tolist())
        self.log: list[Registration] = []
        # Serve runs sync methods in a thread pool: registrations and reads take turns here.
        self.lock = threading.Lock()
        self.index, self.model = None, run.load_model()
        # New items get IDs from their content alone: only the semantic space, and only for models
        # that register items and declare no other space (a behaviour ID needs interactions).
        if self.model.capabilities.registers_items and set(run.ids_dirs) == {"semantic"}:
            from recsys.semantic_ids import SemanticIdIndex, load_tokenizer
            from recsys.text.encoder import load_encoder

            self.text_cfg, self.enc_cfg = run.exp.embed.text, run.exp.embed.encoder
            self.tokenizer = load_tokenizer(run.ids_dirs["semantic"] / "tokenizer")
            self.index = SemanticIdIndex.load(run.ids_dirs["semantic"] / "index")
            self.vocabulary = self.model.vocabulary("semantic")  # what the model has tokens for
            self.encoder = load_encoder(self.enc_cfg)

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

        if self.index is None:
            raise RequestError(422, f"this application serves a {self.run.exp.model_name} model, which cannot register "
                               "new items from their content alone (a generative retriever whose one ID space is "
                               "semantic, such as tiger, can)")
        unknown = sorted(set(fields) - set(self.run.content_fields))
        if unknown:
            raise RequestError(422, f"unknown content field(s) {unknown}; allowed: {self.run.content_fields}")
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
        # nothing has changed so far; from here on nothing can fail
        self.index.add(internal, codes)
        self.ids.add(raw_id)
        entry = Registration(len(self.log) + 1, internal, raw_id, tuple(full), dict(fields))
        self.log.append(entry)
        return entry

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


@serve.deployment(max_ongoing_requests=32)
class Retriever:
    """The model. Requests are checked one by one, then batched (``@serve.batch``) for the model."""

    def __init__(self, run_dir: str, registry: DeploymentHandle, max_k: int, max_history: int | None,
                 max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int, retrieval: str = "model",
                 ann_index: str = "HNSW32", ann_ef_search: int = 128):
        torch.set_num_threads(torch_threads)
        self.run, self.registry, self.max_k = open_run(run_dir), registry, max_k
        self.retrieval, self.ann = retrieval, (ann_index, ann_ef_search)
        self._load()
        self.max_history = min(max_history or self.model.max_len, self.model.max_len)
        self.uses_users = self.model.users_required
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _load(self) -> None:
        """The trained state: the checkpoint's model and the data run's ids, registration log version 0."""
        model = self.run.load_model()
        if self.retrieval == "ann":
            from recsys.faiss_lib import faiss

            from recsys.ann import AnnRetriever

            faiss.omp_set_num_threads(torch.get_num_threads())
            model = AnnRetriever(model, *self.ann)
        self.model = model
        self.ids = ItemIds(self.run.items["raw_id"].astype(str).tolist())
        self.version, self.epoch = 0, None

    async def _sync(self) -> None:
        epoch, entries = await self.registry.since.remote(self.version, self.epoch)
        if epoch != self.epoch and self.version > 0:
            log.warning("the Registry restarted (epoch %s -> %s) and lost %d registered item(s); reloading the "
                        "trained model", self.epoch, epoch, self.version)
            self._load()
        self.epoch = epoch
        self.version = apply_registrations(self.model, self.ids, self.version, entries)

    async def ready(self) -> int:
        return self.model.n_items

    async def recommend(self, request: dict) -> dict:
        await self._sync()
        try:
            check_history(request["history"], self.max_history)
            check_k(request["k"], self.model.n_items, self.max_k)
            history = self.ids.internal(request["history"])
            user, timestamps = request.get("user"), request.get("timestamps")
            check_required_inputs(self.model, user, timestamps)
            now = check_times(len(history), timestamps, request.get("time"))
        except RequestError as err:
            return error_body(err.status, err.message)
        timed = self.model.capabilities.reads_timestamps  # other models ignore the times
        query = Query(history, request["k"], request["exclude_history"], user if self.uses_users else None,
                      timestamps if timed else None, now if timed else None)
        items, scores = await self._batched(query)
        spaces = self.model.capabilities.id_spaces
        codes = {space: self.model.item_ids(space, torch.tensor(items)).tolist() for space in spaces}
        return {"items": [{"id": self.ids.raw(i), "internal_id": i, "score": s,
                           "semantic_id": codes["semantic"][row] if "semantic" in codes else None,
                           "ids": {space: codes[space][row] for space in spaces}}
                          for row, (i, s) in enumerate(zip(items, scores))],
                "catalogue_size": self.model.n_items, "index_version": self.version,
                "replica": serve.get_replica_context().replica_id.unique_id}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, queries: list[Query]) -> list[tuple[list[int], list[float]]]:
        return run_queries(self.model, queries)


def ingress_deployment(api: FastAPI, retries: int) -> serve.Deployment:
    """The HTTP front, defined around ``api`` (``serve.http.make_api``) so that its settings
    travel with it to the replica."""

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
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
                  responses=error_responses(400, 401, 413, 422, 503))
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
    run = open_run(cfg.run_dir)  # fail here, with a clear message, rather than in every replica
    role = get_spec(run.exp.model_name).model_cls.role
    if role != "retriever":
        raise ValueError(f"{run.run_dir} holds a {role} ({run.exp.model_name}); this application serves a "
                         "retriever, which recommends from the whole catalogue")
    if cfg.retrieval == "ann":
        from recsys.ann import AnnRetriever

        AnnRetriever(run.load_model(), cfg.ann_index, cfg.ann_ef_search)  # refuses models without embeddings
    registry = Registry.bind(str(run.run_dir))
    scale = ({"autoscaling_config": cfg.autoscaling_config} if cfg.autoscaling_config is not None
             else {"num_replicas": cfg.num_replicas})
    retriever = Retriever.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=max(32, 2 * cfg.max_batch_size), **scale,
    ).bind(str(run.run_dir), registry, cfg.max_k, cfg.max_history, cfg.max_batch_size, cfg.batch_wait_timeout_s,
           cfg.torch_threads, cfg.retrieval, cfg.ann_index, cfg.ann_ef_search)
    api = make_api(key_sha256=key_hash, max_body_bytes=cfg.max_body_bytes)
    return ingress_deployment(api, cfg.replica_failure_retries).bind(retriever, registry)
