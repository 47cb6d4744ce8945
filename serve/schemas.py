"""Request and response bodies, and the application's arguments (a Serve config's ``args``)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

FieldValue = Union[StrictStr, list[StrictStr], None]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[StrictStr] = Field(min_length=1, description="the user's item ids (the dataset's ids), oldest "
                                     "first; at least one, at most the server's max_history")
    k: StrictInt = Field(10, ge=1, description="how many items to return; 1 <= k <= min(max_k, catalogue size)")
    exclude_history: StrictBool = Field(False, description="never return an item of the history")
    user: StrictInt | None = Field(None, ge=0, description="user index; used only by models with a user token, "
                                   "which require it")
    timestamps: list[StrictInt] | None = Field(None, description="event time of each history item in seconds, "
                                               "same length as history, non-decreasing; read only by models "
                                               "that read timestamps")
    time: StrictInt | None = Field(None, description="the request's time in seconds (default: now); at or after "
                                   "the last history timestamp. A time-aware HSTU reads it as the query time "
                                   "(model.query_time=next_event); with model.query_time=last_event the newest "
                                   "history timestamp is the query time and this is not read")
    user_id: StrictStr | None = Field(None, min_length=1, max_length=200,
                                      description="the dataset's user id (the store's key, not the model's `user` "
                                      "index): the user's stored events come first and `history` (this session's "
                                      "items) is appended; the model reads the last max_len of them. A user the "
                                      "store does not know is a 404, never an empty history")


class ErrorBody(BaseModel):
    """Every error answer: its HTTP status and what was wrong."""

    status: int
    error: str
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems of a 422")


class RecommendedItem(BaseModel):
    id: str
    internal_id: int
    score: float = Field(description="higher first: the retriever's score, or in a cascade the ranker's logit")
    semantic_id: list[int] | None = Field(description="the item's semantic ID; null for atomic-id models")
    ids: dict[str, list[int]] = Field(default_factory=dict,
                                      description="the item's codes in each ID space the model declares "
                                                  "(e.g. semantic, behavior); empty for atomic-id models")
    retriever_rank: int | None = Field(None, description="cascade: the item's 0-based rank in the retriever's list "
                                       "before the ranker re-ranked it; null without a ranker")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    catalogue_size: int
    index_version: int = Field(description="registrations this answer reflects (0 = the trained catalogue)")


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(None, min_length=1, max_length=200,
                                 description="the new item's id; omitted = assigned by the server")
    fields: dict[StrictStr, FieldValue] = Field(min_length=1, description="content fields of the items table, e.g. "
                                                "title, brand; at least one")


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: StrictStr = Field(min_length=1, max_length=200, description="the client's id of this event, unique "
                                "across users: a retried call with the same ids appends nothing twice")
    item: StrictStr = Field(description="the item's id (the dataset's, or one registered with POST /items)")
    time: StrictInt | None = Field(None, ge=0, description="event time in seconds (default: now); not before the "
                                   "user's last event")


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr = Field(min_length=1, max_length=200, description="the dataset's user id; a new id starts "
                               "a new user")
    events: list[EventIn] = Field(min_length=1, max_length=1000, description="oldest first")


class EventsResponse(BaseModel):
    user_id: str
    appended: list[str] = Field(description="event ids recorded by this call, durably (fsync'd) before it answered")
    duplicates: list[str] = Field(description="event ids recorded before (a retry): skipped, the first record stands")
    history_length: int = Field(description="the user's events now")
    clusters: int | None = Field(description="the user's virtual items now (null: the store keeps no clusters)")


class StoredEventOut(BaseModel):
    event_id: str
    item: str
    time: int | None


class UserHistory(BaseModel):
    user_id: str
    events: list[StoredEventOut] = Field(description="oldest first")
    clusters: int | None = Field(description="the user's virtual items (null: the store keeps no clusters)")


class ItemInfo(BaseModel):
    id: str
    internal_id: int
    semantic_id: list[int] | None
    ids: dict[str, list[int]] = Field(default_factory=dict, description="the item's codes per ID space")
    fields: dict[str, Any]
    registered: bool = Field(description="true for items added through POST /items")
    index_version: int


class ServeArgs(BaseModel):
    """Arguments of ``serve.app:build_app`` (the ``args:`` of a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str
    num_replicas: int | None = Field(1, ge=1, description="model replicas; ignored when autoscaling_config is set")
    autoscaling_config: dict | None = None
    max_batch_size: int = Field(8, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=5.0)
    replica_cpus: float = Field(0.5, gt=0.0, le=64.0, description="num_cpus of each model replica")
    torch_threads: int = Field(1, ge=1, le=256)
    max_history: int | None = Field(None, ge=1, description="longest accepted history; default the model's max_len")
    max_k: int = Field(100, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=256, description="larger request bodies get 413")
    api_key_env: str | None = Field(None, description="name of an environment variable holding the API key; "
                                    "when set, requests need it in X-API-Key")
    retrieval: Literal["model", "ann"] = Field("model", description="model: the model's own recommend (beam "
                                               "search for TIGER); ann: the ANN baseline (recsys.ann), for "
                                               "models with user/item embeddings such as sasrec")
    ann_index: str = Field("HNSW32", description="retrieval=ann: faiss index, 'Flat' (exact) or 'HNSW<M>'")
    ann_ef_search: int = Field(128, ge=1, description="retrieval=ann: HNSW search breadth")
    store: dict | None = Field(None, description="the serving state (recsys.history.store.StoreConfig): {kind: "
                               "sqlite, path: FILE, create: false}, e.g. the store `recsys history` made. Registered "
                               "items and events are written there before they are acknowledged. Without one the app "
                               "registers no items and records no events (it could not keep them)")
    replica_failure_retries: int = Field(2, ge=0, le=10, description="times a /recommend is retried on another "
                                         "replica when its replica dies mid-request")
    ranker_dir: str | None = Field(None, description="a ranker's train run (e.g. twin_v2, trained by `recsys rank` on "
                                   "this retriever's candidates): /recommend then re-ranks the retriever's top "
                                   "cascade_top_n by it. A `recsys rank` run given as run_dir names its ranker itself")
    cascade_top_n: int | None = Field(None, ge=1, le=10000, description="cascade: the retriever's top items the ranker "
                                      "re-ranks (default: the rank run's top-N, else 100); k <= cascade_top_n")
    inference: dict[str, Any] = Field(default_factory=dict, description="the model's inference settings changed from "
                                      "its checkpoint's, e.g. {fusion: behavior} (EAGER: one stream alone) or "
                                      "{beam_size: 50}; only the keys the model names (Capabilities.inference_settings)")
    ranker_max_history: int = Field(5000, ge=1, le=10**6, description="cascade: the ranker reads at most the user's "
                                    "last this many events (stored, then the request's)")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig

            # Serve's schema checks values but ignores unknown keys: a typo would silently do nothing
            unknown = sorted(set(self.autoscaling_config) - set(AutoscalingConfig.model_fields))
            if unknown:
                raise ValueError(f"autoscaling_config has unknown key(s) {unknown}; allowed: "
                                 f"{sorted(AutoscalingConfig.model_fields)}")
            AutoscalingConfig(**self.autoscaling_config)
            self.num_replicas = None
        if self.store is not None:
            from recsys.history.store import StoreConfig

            unknown = sorted(set(self.store) - set(StoreConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"store has unknown key(s) {unknown}; allowed: {sorted(StoreConfig.__dataclass_fields__)}")
            StoreConfig(**self.store)
        return self
