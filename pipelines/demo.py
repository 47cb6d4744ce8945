"""``recsys demo`` (``make demo``): the whole product in a few minutes, on the generated dataset.

data -> embed (Ray Data) -> semantic IDs -> the generative model, and a baseline (SASRec) on the
same data run -> test over the whole catalogue -> the results table -> the endpoint (Ray Serve):
one real ``POST /recommend``, its answer, and the endpoint stopped again.

The console gets one line per stage with its time, the training loop's line per epoch (and its
progress bar on a terminal), the table and the run directory. Everything lands in one
``runs/demo/<run-id>/``: ``data/``, ``embed/``, ``ids/``, and ``<model>/{train,evaluate}`` per model.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import pandas as pd

from recsys.config import deep_merge
from recsys.data import InteractionData
from recsys.experiment import (
    ExperimentConfig, experiment_from_dict, load_experiment, load_experiment_yaml, parse_experiment_overrides,
)
from recsys.models import get_spec
from recsys.reporting import results_table
from recsys.runs import (
    CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, mark_complete, new_run_dir, read_json, write_json, write_text,
)

BASELINE_PREFIX = "baseline."
SHARED_SECTIONS = ("data", "run")  # the baseline trains on the demo's data run, inside the demo's run
READY_TIMEOUT_S = 120.0


@dataclass
class StageClock:
    """Prints one line per stage: its name, its wall time and what it made."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        """``with clock.stage("data") as note: ...; note.append("2,000 users")``: the line comes at the end."""
        note: list[str] = []
        start = time.perf_counter()
        yield note
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(stage_line(name, self.seconds[name], "; ".join(note)), file=self.out, flush=True)


def stage_line(name: str, seconds: float, note: str = "") -> str:
    return f"[{name}] {seconds:.1f} s" + (f"  {note}" if note else "")


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``baseline.key=value`` goes to the baseline (prefix removed); the rest to the demo's model."""
    main = [o for o in overrides if not o.startswith(BASELINE_PREFIX)]
    baseline = [o[len(BASELINE_PREFIX):] for o in overrides if o.startswith(BASELINE_PREFIX)]
    return main, baseline


def load_demo(path: str | Path | None, baseline_path: str | Path, overrides: Sequence[str] = ()
              ) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The demo's experiment and its baseline's. The baseline's file gives its model, trainer and
    eval; its ``data`` and ``run`` are the demo's, so both train on one data run."""
    main_overrides, baseline_overrides = split_overrides(overrides)
    exp = load_experiment(path, main_overrides)
    raw = deep_merge(load_experiment_yaml(baseline_path), parse_experiment_overrides(baseline_overrides))
    for section in SHARED_SECTIONS:
        if section in raw:
            raise ValueError(f"{baseline_path}: the baseline takes `{section}:` from the demo's config "
                             f"({path or 'the defaults'}), so both models train on one data run; remove "
                             f"`{section}:` (or baseline.{section}.* overrides) and set it there")
    shared = {k: v for k, v in exp.to_dict().items() if k in SHARED_SECTIONS}
    baseline = experiment_from_dict(deep_merge(raw, shared))
    for which, e in (("model", exp), ("baseline", baseline)):
        spaces = set(get_spec(e.model_name).model_cls.capabilities.id_spaces)
        if spaces - {"semantic"}:
            raise ValueError(f"the demo builds the semantic ID space only; the {which} model.name={e.model_name!r} "
                             f"decodes {sorted(spaces)}")
    if exp.model_name == baseline.model_name:
        raise ValueError(f"the demo compares two models; both are model.name={exp.model_name!r}")
    return exp, baseline


def run_demo(exp: ExperimentConfig, baseline: ExperimentConfig, serve_k: int = 10,
             out: TextIO | None = None) -> Path:
    """Run every stage into a new ``runs/demo/<run-id>/``, print the table, serve one request; returns
    the run directory."""
    from pipelines.stages import run_data, run_embed_stage, run_ids_stage

    out = out or sys.stdout
    clock = StageClock(out)
    run_dir = new_run_dir(exp.run.root, "demo", exp.run.name)
    write_json(run_dir / CONFIG_FILE, {"model": exp.to_dict(), "baseline": baseline.to_dict()})
    print(f"recsys demo: {exp.model_name} against {baseline.model_name} on the {exp.data.format} dataset; "
          f"run directory {run_dir}", file=out, flush=True)
    with clock.stage("data") as note:
        data_dir = run_data(exp, run_dir)
        stats = read_json(data_dir / METRICS_FILE)
        note.append(f"{stats['n_users']:,} users, {stats['n_items']:,} items, {stats['n_interactions']:,} events")
    with clock.stage("embed") as note:
        embed_dir = run_embed_stage(exp, data_dir, run_dir)
        m = read_json(embed_dir / METRICS_FILE)
        note.append(f"{m['n_items']:,} item texts -> {m['dim']}-d vectors "
                    f"{'with Ray Data' if m['use_ray'] else 'in-process'} "
                    f"({m['encoded']:,} encoded, {m['reused']:,} reused from earlier runs)")
    with clock.stage("ids") as note:
        ids_dir = run_ids_stage(exp, embed_dir=embed_dir, parent=run_dir)
        m = read_json(ids_dir / METRICS_FILE)
        note.append(f"{m['method']}: {m['levels']} levels of {m['codebook_sizes']} codes + a collision level, "
                    f"{'on Ray' if m['use_ray'] else 'in-process'}; collision rate {m['collision_rate']:.3f}")
    results: dict[str, dict] = {}
    for e in (exp, baseline):
        results[e.model_name] = train_and_test(e, data_dir, {"semantic": ids_dir}, run_dir / e.model_name, clock)
    table = demo_table(results)
    print(f"\n{table}\n", file=out)
    verdict = comparison_note(exp.model_name, baseline.model_name, results)
    if verdict:
        print(verdict + "\n", file=out)
    with clock.stage("serve") as note:
        answer = serve_one_request(run_dir / exp.model_name, data_dir, exp.data.max_history, serve_k, out)
        note.append(f"Ray Serve answered POST /recommend with {len(answer['items'])} items, then stopped")
    write_json(run_dir / METRICS_FILE, {"models": results, "stage_s": clock.seconds, "served": answer})
    write_text(run_dir / SUMMARY_FILE, f"# demo: {exp.model_name} against {baseline.model_name}\n\n{table}\n\n"
               + (f"{verdict}\n\n" if verdict else "")
               + "".join(f"- {stage_line(k, v)}\n" for k, v in clock.seconds.items()))
    mark_complete(run_dir, "demo")
    print(f"demo run: {run_dir}", file=out, flush=True)
    return run_dir


def train_and_test(exp: ExperimentConfig, data_dir: Path, ids_dirs: dict[str, Path], model_dir: Path,
                   clock: StageClock) -> dict:
    """Train one model into ``model_dir/train`` (selected on validation), test it once into
    ``model_dir/evaluate``; returns its valid and test figures."""
    from pipelines.stages import run_evaluate, run_train

    declared = get_spec(exp.model_name).model_cls.capabilities.id_spaces
    with clock.stage(f"train {exp.model_name}") as note:
        train_dir = run_train(exp, data_dir=data_dir, ids_dirs={s: ids_dirs[s] for s in declared}, parent=model_dir)
        m = read_json(train_dir / METRICS_FILE)
        where = "Ray Train" if exp.trainer.resources.use_ray else "in-process"
        note.append(f"selected epoch {m['best_epoch']} of {m['epochs_run']} on valid "
                    f"{exp.trainer.selection.select_metric}, {where}")
    with clock.stage(f"test {exp.model_name}") as note:
        _, test = run_evaluate(train_dir, "test", parent=model_dir)
        note.append(f"whole catalogue; recall@10 {test['recall@10']:.4f}, ndcg@10 {test['ndcg@10']:.4f}")
    return {"valid": m["valid"], "test": test, "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
            "validated_users": m["validated_users"], "train_s": m["wall_s"]}


def demo_table(results: dict[str, dict]) -> str:
    """Both models, validation (the selected epoch) and test, in one table."""
    rows = {}
    for name, r in results.items():
        users = f", {r['validated_users']:,} users" if r.get("validated_users") else ""
        rows[f"{name}, valid (selected{users})"] = r["valid"]
        rows[f"{name}, test"] = r["test"]
    return results_table(rows).replace("| split |", "| model, split |", 1)


def comparison_note(model: str, baseline: str, results: dict[str, dict], metric: str = "recall@10") -> str:
    """One line when the demo's model trails its baseline on test ``metric``, saying why; empty otherwise."""
    ours, theirs = results[model]["test"][metric], results[baseline]["test"][metric]
    if ours >= theirs:
        return ""
    run = results[model]
    if run["best_epoch"] == run["epochs_run"]:
        why = (f"it was still improving on validation at its last epoch ({run['epochs_run']}), where the demo's "
               "time budget stops it")
    else:
        why = f"it peaked on validation at epoch {run['best_epoch']} of {run['epochs_run']}"
    return f"note: {model} trails {baseline} on test {metric} ({ours:.4f} against {theirs:.4f}): {why}; {SEE_ALSO}"


SEE_ALSO = "see docs/experiments/demo.md."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_request(data_dir: Path, max_history: int, k: int) -> tuple[dict, str, pd.DataFrame]:
    """A real user's request: the first user's history without its last item (that user's test
    target), at most ``max_history`` items. Returns the body, the held-out item's id, the items table."""
    data = InteractionData.load(data_dir)
    items = data.items.set_index("item_id")
    seq = list(data.sequences["item_ids"].iloc[0])
    history = [str(items.at[i, "raw_id"]) for i in seq[:-1][-max_history:]]
    return {"history": history, "k": k}, str(items.at[seq[-1], "raw_id"]), items.set_index("raw_id")


def post_json(url: str, body: dict, timeout_s: float = 60.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Serve's proxy answers 404 (or refuses) until the replicas are up; poll ``/healthz`` for a 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the endpoint at {url} did not become ready in {timeout_s:.0f} s")
        time.sleep(0.25)


# One request needs no access log; Serve's warnings and errors still show.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def serve_one_request(train_run: Path, data_dir: Path, max_history: int, k: int, out: TextIO) -> dict:
    """Start the endpoint on a free local port, send one ``POST /recommend``, print it and the
    answer, stop the endpoint. Returns the answer."""
    import logging

    from pipelines.ray_env import init_ray, on_cluster
    from serve.launch import prepare, start

    body, held_out, items = demo_request(data_dir, max_history, k)
    app = prepare({"run_dir": str(train_run)})
    init_ray()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's INFO lines ("Started Serve ...")
    try:
        url = start(app, "127.0.0.1", free_port(), name="demo", logging_config=SERVE_LOGGING)
        wait_ready(url)
        answer = post_json(f"{url}/recommend", body)
    finally:
        stop_endpoint("demo", local=not on_cluster())
    print(format_exchange(url, body, answer, held_out, items), file=out, flush=True)
    return answer


def stop_endpoint(name: str, local: bool) -> None:
    """Delete the app (its replicas stop cleanly). Locally, Ray then shuts down, taking Serve's
    controller and proxy with it: ``serve.shutdown()`` would make the controller kill itself while
    its own shutdown call is pending, which Ray reports as a failed task to retry. On a cluster the
    Serve instance is shut down and the cluster stays."""
    import ray
    from ray import serve

    serve.delete(name)
    if local:
        ray.shutdown()
    else:
        serve.shutdown()


def format_exchange(url: str, body: dict, answer: dict, held_out: str, items: pd.DataFrame) -> str:
    """The request and the answer, with item titles so a person can judge it."""
    title = items["title"] if "title" in items else pd.Series(dtype=str)
    last = body["history"][-3:]
    lines = [f"POST {url}/recommend  {{\"history\": [{len(body['history'])} item ids], \"k\": {body['k']}}}",
             "  last items of the history: " + "; ".join(f"{i} {title.get(i, '')}".strip() for i in last),
             f"  answer ({answer['catalogue_size']} items in the catalogue):"]
    for rank, item in enumerate(answer["items"], 1):
        mark = "  <- this user's held-out next item" if item["id"] == held_out else ""
        lines.append(f"  {rank:>2}. {item['id']}  score {item['score']:.3f}  id {item.get('semantic_id')}  "
                     f"{title.get(item['id'], '')}{mark}")
    return "\n".join(lines) + "\n"
