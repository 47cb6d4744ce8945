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
of the application forgets registered items (not persisted in this first cut).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys.runs import read_json
from serve.run import CHECKPOINT, open_run
from serve.schemas import ItemInfo, NewItem, RecommendRequest, RecommendResponse, ServeArgs
from serve.state import ItemIds, Query, Registration, RequestError, apply_registrations, check_history, check_k, run_queries

log = logging.getLogger("ray.serve")
OPEN_PATHS = {"/healthz", "/docs", "/openapi.json"}  # answered without the API key


def _error(status: int, message: str, **extra: Any) -> dict:
    return {"status": status, "error": message, **extra}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Registry:
    """The single writer: new items get their semantic ID and internal id here, in log order."""

    def __init__(self, run_dir: str):
        from recsys.semantic_ids import SemanticIdIndex, load_tokenizer
        from recsys.text.encoder import load_encoder

        run = open_run(run_dir)
        if run.ids_dir is None:
            raise ValueError(f"{run.run_dir} trained a model without semantic IDs; it cannot register items")
        self.run = run
        self.text_cfg, self.enc_cfg = run.exp.embed.text, run.exp.embed.encoder
        self.tokenizer = load_tokenizer(run.ids_dir / "tokenizer")
        self.index = SemanticIdIndex.load(run.ids_dir / "index")
        meta = read_json(run.run_dir / CHECKPOINT / "model.json")
        self.level_sizes = meta["context"]["level_sizes"]
        self.encoder = load_encoder(self.enc_cfg)
        self.ids = ItemIds(run.items["raw_id"].astype(str).tolist())
        self.log: list[Registration] = []

    def since(self, version: int) -> list[Registration]:
        return self.log[version:]

    def register(self, raw_id: str | None, fields: dict) -> dict:
        # Synchronous and without awaits, so registrations never interleave: ids and collision
        # codes are handed out in log order.
        from recsys.text import build_texts
        from recsys.text.encoder import encode

        try:
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
            if any(c >= s for c, s in zip(full, self.level_sizes)):
                raise RequestError(409, f"semantic ID {list(full)} does not fit the model's vocabulary "
                                   f"{self.level_sizes}: its content tuple has no free collision code left")
        except RequestError as err:
            return _error(err.status, err.message)
        self.index.add(internal, codes)
        self.ids.add(raw_id)
        entry = Registration(len(self.log) + 1, internal, raw_id, tuple(full), dict(fields))
        self.log.append(entry)
        return {"entry": entry}

    def item(self, raw_id: str) -> dict:
        if raw_id not in self.ids:
            return _error(404, f"unknown item id {raw_id!r}")
        internal = self.ids.internal([raw_id])[0]
        if internal <= len(self.run.items):
            row = self.run.items.iloc[internal - 1]
            fields = {c: _plain(row[c]) for c in self.run.content_fields}
            registered = False
        else:
            fields, registered = self.log[internal - len(self.run.items) - 1].fields, True
        return {"item": ItemInfo(id=raw_id, internal_id=internal, semantic_id=list(self.index.id_of(internal)),
                                 fields=fields, registered=registered, index_version=len(self.log))}


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
                 max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int):
        torch.set_num_threads(torch_threads)
        run = open_run(run_dir)
        self.model = run.load_model()
        self.ids = ItemIds(run.items["raw_id"].astype(str).tolist())
        self.version = 0
        self.registry = registry
        self.max_k = max_k
        self.max_history = min(max_history or self.model.max_len, self.model.max_len)
        self.uses_users = bool(getattr(getattr(self.model, "config", None), "user_tokens", 0))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _sync(self) -> None:
        entries = await self.registry.since.remote(self.version)
        self.version = apply_registrations(self.model, self.ids, self.version, entries)

    async def recommend(self, request: dict) -> dict:
        await self._sync()
        try:
            check_history(request["history"], self.max_history)
            check_k(request["k"], self.model.n_items, self.max_k)
            history = self.ids.internal(request["history"])
            user = request.get("user")
            if self.uses_users and user is None:
                raise RequestError(422, "this model conditions on the user (model.user_tokens > 0): give `user`")
        except RequestError as err:
            return _error(err.status, err.message)
        query = Query(history, request["k"], request["exclude_history"], user if self.uses_users else None)
        items, scores = await self._batched(query)
        codes = self.model.item_codes
        return {"items": [{"id": self.ids.raw(i), "internal_id": i, "score": s, "semantic_id": codes[i].tolist()}
                          for i, s in zip(items, scores)],
                "catalogue_size": self.model.n_items, "index_version": self.version,
                "replica": serve.get_replica_context().replica_id.unique_id}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, queries: list[Query]) -> list[tuple[list[int], list[float]]]:
        return run_queries(self.model, queries)


app = FastAPI(title="ray-genrec generative retriever",
              description="Next-item recommendation by generating semantic IDs. Item ids are the dataset's ids.")


_SETTINGS: dict = {"api_key_sha256": "", "max_body_bytes": 64 * 1024}  # set by Ingress.__init__


class Guard:
    """ASGI middleware: the API key and the body-size limit, before FastAPI parses anything. The
    body is read here up to the limit (chunked bodies have no content-length) and replayed."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if _SETTINGS["api_key_sha256"] and scope["path"] not in OPEN_PATHS:
            given = headers.get("x-api-key", "")
            if not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), _SETTINGS["api_key_sha256"]):
                return await _send(scope, receive, send, 401, "missing or wrong X-API-Key header")
        limit = _SETTINGS["max_body_bytes"]
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send(scope, receive, send, 413, f"request body of {declared} bytes exceeds the limit "
                               f"of {limit} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send(scope, receive, send, 413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    await JSONResponse(_error(status, message), status_code=status)(scope, receive, send)


app.add_middleware(Guard)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(_error(400, "malformed JSON body"), status_code=400)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse(_error(422, f"invalid request: {problems}", details=details), status_code=422)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(_error(exc.status_code, str(exc.detail)), status_code=exc.status_code)


def _reply(result: dict) -> Any:
    if "status" in result:
        return JSONResponse(result, status_code=result["status"])
    return result


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, registry: DeploymentHandle, settings: dict):
        self.retriever, self.registry = retriever, registry
        _SETTINGS.update(settings)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> Any:
        result = await self.retriever.recommend.remote(body.model_dump())
        if "status" in result:
            return _reply(result)
        replica = result.pop("replica")
        return JSONResponse(RecommendResponse(**result).model_dump(), headers={"X-Served-By": replica})

    @app.post("/items", response_model=ItemInfo, status_code=201)
    async def register(self, body: NewItem) -> Any:
        result = await self.registry.register.remote(body.id, body.fields)
        if "status" in result:
            return _reply(result)
        e: Registration = result["entry"]
        return ItemInfo(id=e.raw_id, internal_id=e.internal_id, semantic_id=list(e.semantic_id), fields=e.fields,
                        registered=True, index_version=e.version)

    @app.get("/items/{item_id}", response_model=ItemInfo)
    async def get_item(self, item_id: str) -> Any:
        result = await self.registry.item.remote(item_id)
        return _reply(result) if "status" in result else result["item"]


def build_app(args: dict) -> serve.Application:
    """The application from a Serve config's ``args`` (see ``ServeArgs``)."""
    cfg = ServeArgs(**args)
    key_hash = ""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"api_key_env={cfg.api_key_env!r} but that environment variable is unset or empty")
        key_hash = hashlib.sha256(key.encode()).hexdigest()  # only the hash reaches the Serve config
    open_run(cfg.run_dir)  # fail here, with a clear message, rather than in every replica
    registry = Registry.bind(cfg.run_dir)
    scale = ({"autoscaling_config": cfg.autoscaling_config} if cfg.autoscaling_config is not None
             else {"num_replicas": cfg.num_replicas})
    retriever = Retriever.options(
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=max(32, 2 * cfg.max_batch_size), **scale,
    ).bind(cfg.run_dir, registry, cfg.max_k, cfg.max_history, cfg.max_batch_size, cfg.batch_wait_timeout_s,
           cfg.torch_threads)
    settings = {"api_key_sha256": key_hash, "max_body_bytes": cfg.max_body_bytes}
    return Ingress.bind(retriever, registry, settings)


def describe(args: dict) -> str:
    return json.dumps(ServeArgs(**args).model_dump(), indent=2)
