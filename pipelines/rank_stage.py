"""The ranking stage: train a Ranker on a retriever's candidate sets (``recsys train --candidates``)
and the cascade ``recsys rank --retriever RUN`` (candidates -> ranker -> test once).

The ranker's training examples must be transitions the retriever that scored them never trained
on: a retriever that learned a transition's target hands the ranker lists in which the target
sits on top, teaching it to trust the retriever blindly. Two ways:
- **holdout** (default): the retriever was trained with ``trainer.data.ranker_holdout=true``, and
  the ranker trains on each user's last training transition. The served retriever then lacks
  those transitions (on Beauty that cost more than the ranker gained).
- **folds** (``--folds K``): K more retrievers, each trained as RUN was but without one user fold
  (``trainer.data.folds``); each fold's users' last ``--fold-examples`` training transitions are
  scored by the retriever that never saw those users. RUN itself (trained on every training
  transition) gives the validation and test candidates and is what the cascade serves, so nothing
  is held out of it, and the ranker gets up to M examples per user instead of one.

Behaviour IDs (EAGER's, clustered from a two-tower's or SASRec's item vectors) learned from the
transitions their source trained on, so they follow the same rule: with the holdout their source
must have held the ranker's transition out too (checked); with folds each fold retriever decodes
IDs clustered from its source retrained without the fold's users (``fold_behaviour_ids``), unless
that source left the last M transitions out. Content IDs never saw a transition and are shared.

The ranker's frozen item vectors come from RUN's item table by default, which (with folds) trained
on the examples' transitions: a similarity feature can then look better on training examples than
at test. A retriever without an item table (TIGER, EAGER) gives the content vectors its semantic
IDs were built from (the ``recsys embed`` run behind its IDs run), which trained on no transition.
``--vectors-from VRUN`` takes them from another run of the same data instead: a ``recsys embed``
run (content vectors), or a retriever run trained with ``trainer.data.drop_last_transitions`` >=
the examples per user (1 for the holdout), whose table never saw any example's target. One table
serves training, validation and test.

A rank run writes its inputs first (``request.json``), so ``recsys rank --resume RUN``
(``resume_rank``) continues an interrupted one: finished fold retrievers, behaviour IDs and
candidates are reused, an unfinished fold retriever continues from its last checkpoint, and an
unfinished stage without checkpoints starts over.

Figures: the re-ranked Recall/NDCG@K, AUC and GAUC of the ranker beside the same retriever alone
on the same candidates (its own order and scores), on every test user and on users with more than
``max_history`` prior items; the paired standard error of the per-user NDCG@10 difference.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recsys.candidates import CandidateSet, candidate_metrics, candidates_file, histories_inputs, retrieve
from recsys.data import InteractionData
from recsys.data.split import leave_one_out, user_folds
from recsys.experiment import (
    ExperimentConfig, experiment_dict_from_run, experiment_from_dict, ids_runs_of, resumed_experiment,
)
from recsys.metrics import reranked_ranks
from recsys.models import build_model, get_spec
from recsys.reporting import results_table
from recsys.runs import (
    COMPLETE_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, clear_complete, finished_stage, mark_complete,
    read_json, require_complete, stage_run_dir, write_json, write_text,
)
from recsys.text.store import load_embeddings
from recsys.training.checkpoint import load_model, save_checkpoint
from recsys.training.evaluate import ranker_figures, ranker_scores
from recsys.training.ranker import train_ranker

VECTOR_STAGES = ("train", "embed")  # the runs that can give a ranker its item vectors
FOLDS_FILE = "folds.json"  # what a directory of fold retrievers was made for (run_fold_retrievers)
RANK_REQUEST = "request.json"  # a rank run's inputs, written first, so that an interrupted run can resume


def require_ranker(exp: ExperimentConfig) -> None:
    role = get_spec(exp.model_name).model_cls.role
    if role != "ranker":
        raise ValueError(f"model.name={exp.model_name!r} is a {role}; `recsys rank` trains a ranker (e.g. twin, "
                         "twin_v2)")
    if exp.trainer.resources.use_ray:  # said, not silently ignored
        raise ValueError("rankers train in-process (Ray Train is not wired for them yet): set "
                         "trainer.resources.use_ray=false")


def retriever_experiment(retriever_dir: Path) -> tuple[ExperimentConfig, dict]:
    saved = read_json(require_complete(retriever_dir, "train") / CONFIG_FILE)
    return experiment_from_dict(experiment_dict_from_run(saved)), saved


def behaviour_sources(saved: dict) -> dict[str, Path]:
    """The ID spaces of a train run (its config.json) whose ids run clusters a train run's item
    vectors (``recsys ids --from-train``: behaviour IDs, e.g. EAGER's) -> that train run. Such IDs
    learned from the transitions their source trained on, unlike content IDs."""
    sources = {}
    for space, ids_dir in ids_runs_of(saved).items():
        source = read_json(Path(ids_dir) / CONFIG_FILE).get("train_dir")
        if source:
            sources[space] = Path(source)
    return sources


def require_holdout(retriever_dir: Path) -> None:
    rexp, saved = retriever_experiment(retriever_dir)
    if not rexp.trainer.data.ranker_holdout:
        raise ValueError(f"the retriever {retriever_dir} trained on every training transition, including the one a "
                         "ranker trains on (each user's last, s[n-3]); retrain it with "
                         "trainer.data.ranker_holdout=true")
    for space, source in behaviour_sources(saved).items():
        data = retriever_experiment(source)[0].trainer.data
        if not (data.ranker_holdout or data.drop_last_transitions >= 1):
            raise ValueError(f"the retriever {retriever_dir} decodes {space} IDs clustered from {source}, which trained "
                             "on every training transition, including the one the ranker trains on; rebuild those IDs "
                             "(`recsys ids --from-train`) from a run trained with trainer.data.ranker_holdout=true")


def require_vectors_run(vectors_dir: Path, retriever_dir: Path, examples_last: int) -> None:
    """``vectors_dir`` may give the item vectors of a ranker trained on each user's last
    ``examples_last`` training transitions: a ``recsys embed`` run of the same data (content vectors
    train on no transition), or a retriever run of the same data with an item table whose training
    left those transitions out."""
    stage = finished_stage(vectors_dir, VECTOR_STAGES)
    saved = read_json(Path(vectors_dir) / CONFIG_FILE)
    rsaved = read_json(Path(retriever_dir) / CONFIG_FILE)
    if Path(saved["data_dir"]).resolve() != Path(rsaved["data_dir"]).resolve():
        raise ValueError(f"--vectors-from {vectors_dir} was made from {saved['data_dir']}, the retriever "
                         f"{retriever_dir} was trained on {rsaved['data_dir']}: the item vectors must be of the same "
                         "catalogue")
    if stage == "embed":
        return
    vexp, _ = retriever_experiment(vectors_dir)
    if get_spec(vexp.model_name).model_cls.role != "retriever" or \
            not get_spec(vexp.model_name).model_cls.capabilities.item_vectors:
        raise ValueError(f"--vectors-from {vectors_dir} is a {vexp.model_name} run, which has no item table; give a "
                         "retriever with item vectors (e.g. sasrec, two_tower) or a `recsys embed` run")
    dropped = vexp.trainer.data.drop_last_transitions
    if dropped < examples_last:
        raise ValueError(f"--vectors-from {vectors_dir} left each user's last {dropped} training transitions out, "
                         f"but the ranker trains on the last {examples_last}: retrain it with "
                         f"trainer.data.drop_last_transitions={examples_last} (or more)")


def item_vectors_run(retriever_dir: Path, vectors_from: Path | None = None) -> Path | None:
    """The run whose vectors the ranker freezes as its item vectors: ``vectors_from`` when given;
    else the retriever's own item table; else, for a retriever without one (TIGER, EAGER), the
    ``recsys embed`` run its semantic IDs were built from; None when there is none of these."""
    if vectors_from is not None:
        return Path(vectors_from)
    rexp, saved = retriever_experiment(retriever_dir)
    if get_spec(rexp.model_name).model_cls.capabilities.item_vectors:
        return Path(retriever_dir)
    ids_dir = ids_runs_of(saved).get("semantic")
    embed_dir = None if ids_dir is None else read_json(Path(ids_dir) / CONFIG_FILE).get("embed_dir")
    return None if embed_dir is None else Path(embed_dir)


def ranker_context(vectors_dir: Path | None) -> dict:
    """The item vectors of ``vectors_dir`` (``item_vectors_run``; row 0: padding) as the ranker's
    frozen item vectors: an embed run's content vectors, or a retriever's item table; None: no
    vectors (the ranker reads item IDs only)."""
    if vectors_dir is None:
        return {}
    if finished_stage(vectors_dir, VECTOR_STAGES) == "embed":
        table = torch.from_numpy(load_embeddings(vectors_dir)[1])
    else:
        with torch.no_grad():
            table = load_model(Path(vectors_dir) / "checkpoints" / "best").item_embeddings().float().cpu()  # (N, D)
    return {"item_vectors": torch.cat([torch.zeros(1, table.shape[1]), table])}


def run_train_ranker(exp: ExperimentConfig, candidates_dir: Path, parent: Path | None = None,
                     vectors_dir: Path | None = None) -> Path:
    """Train ``exp``'s ranker on a candidates run; select on validation (no test figure here).
    ``vectors_dir``: the run whose vectors the ranker freezes as its item vectors (default: see
    ``item_vectors_run``)."""
    require_ranker(exp)
    candidates_dir = require_complete(candidates_dir, "candidates")
    cand_config = read_json(candidates_dir / CONFIG_FILE)
    for name in ("train", "valid"):
        if name not in cand_config["splits"]:
            raise ValueError(f"{candidates_dir} has no {name} candidates; make them with --splits train,valid,test")
    retriever_dir = Path(cand_config["train_dir"])
    examples = cand_config.get("train_examples")  # None: each user's last training transition (holdout)
    if examples is None:
        require_holdout(retriever_dir)
    if vectors_dir is not None:
        require_vectors_run(Path(vectors_dir), retriever_dir, 1 if examples is None else examples["last"])
    vectors_dir = item_vectors_run(retriever_dir, vectors_dir)
    split = leave_one_out(InteractionData.load(cand_config["data_dir"]), cand_config["max_history"])
    train_histories = split.full_histories("train") if examples is None else \
        split.training_transitions(examples["last"])
    run_dir = stage_run_dir(exp.run.root, "train", exp.run.name or exp.model_name, parent)
    write_json(run_dir / CONFIG_FILE, {**exp.to_dict(), "data_dir": cand_config["data_dir"],
                                       "candidates_dir": str(candidates_dir), "retriever_dir": str(retriever_dir),
                                       "item_vectors_dir": None if vectors_dir is None else str(vectors_dir)})
    if exp.trainer.resources.threads:
        torch.set_num_threads(exp.trainer.resources.threads)
    torch.manual_seed(exp.trainer.data.seed)
    model = build_model(exp.model_name, exp.model, n_items=split.n_items, max_len=cand_config["max_history"],
                        **ranker_context(vectors_dir))
    load = lambda name: CandidateSet.load(candidates_dir / candidates_file(name))  # noqa: E731
    start = time.perf_counter()
    fit = train_ranker(model, load("train"), train_histories, load("valid"),
                       split.full_histories("valid"), exp.trainer, random_negatives_n=exp.model.random_negatives,
                       missed_targets=exp.model.missed_targets)
    wall = time.perf_counter() - start
    save_checkpoint(run_dir / "checkpoints" / "best", model, exp.model_name)
    write_json(run_dir / "epochs.json", fit.history)
    write_json(run_dir / METRICS_FILE, {"valid": fit.valid, "best_epoch": fit.best_epoch,
                                         "epochs_run": fit.history[-1]["epoch"], "wall_s": round(wall, 2)})
    write_text(run_dir / SUMMARY_FILE, f"# train ranker: {exp.model_name}\n\n- selected epoch {fit.best_epoch} of "
               f"{fit.history[-1]['epoch']} on validation {exp.trainer.selection.select_metric}; {wall:.0f} s\n\n"
               + results_table({"valid": fit.valid}) + "\n")
    mark_complete(run_dir, "train")
    return run_dir


def retriever_alone(candidates: CandidateSet) -> dict:
    """The retriever's own figures on its candidates: its order, its scores as the ranking scores."""
    return ranker_figures(candidates.scores.astype(np.float64), candidates)


def per_user_ndcg10(scores: np.ndarray, candidates: CandidateSet) -> np.ndarray:
    ranks = reranked_ranks(torch.from_numpy(scores), torch.from_numpy(candidates.candidates),
                           torch.from_numpy(candidates.targets)).numpy()
    return np.where((ranks >= 0) & (ranks < 10), 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def without_fold(exp: ExperimentConfig, folds: int, fold: int) -> ExperimentConfig:
    """``exp`` trained without user fold ``fold`` of ``folds`` (and nothing else held out)."""
    data = replace(exp.trainer.data, folds=folds, fold=fold, ranker_holdout=False, drop_last_transitions=0)
    return replace(exp, trainer=replace(exp.trainer, data=data),
                   run=replace(exp.run, name=f"{exp.run.name or exp.model_name}-fold{fold}of{folds}"))


def finished_or_cleared(run_dir: Path, stage: str) -> Path | None:
    """An earlier attempt's ``stage`` run at ``run_dir`` (a fixed place inside a stage directory):
    returned when it finished; removed when it did not, so the stage starts over there."""
    if not run_dir.exists():
        return None
    if (run_dir / COMPLETE_FILE).is_file():
        finished_stage(run_dir, (stage,))
        return run_dir.resolve()
    print(f"{run_dir}: an unfinished {stage} run from an earlier attempt; starting it over", flush=True)
    shutil.rmtree(run_dir)
    return None


def train_or_resume(exp: ExperimentConfig, home: Path | None, **inputs) -> Path:
    """``run_train(exp, parent=home, **inputs)``. When ``home`` holds an earlier attempt's train run
    (an interrupted cascade), a finished one is reused and an unfinished one continues from its
    last checkpoint (``recsys train --resume``); one stopped before its first checkpoint starts
    over. The earlier run must be the same fold of the same model, else ValueError."""
    from pipelines.stages import run_train

    existing = None if home is None else home / "train"
    if existing is None or not existing.exists():
        return run_train(exp, parent=home, **inputs)
    saved = read_json(existing / CONFIG_FILE)
    want = (exp.model_name, exp.trainer.data.folds, exp.trainer.data.fold)
    found = (saved["model"]["name"], saved["trainer"]["data"]["folds"], saved["trainer"]["data"]["fold"])
    if found != want:
        raise ValueError(f"{existing} trained {found[0]} without fold {found[2]} of {found[1]}, not {want[0]} without "
                         f"fold {want[2]} of {want[1]}: it belongs to another cascade")
    if (existing / COMPLETE_FILE).is_file():
        return require_complete(existing, "train")
    if (existing / "checkpoints" / "last").exists():
        print(f"{existing}: resuming from its last checkpoint", flush=True)
        return run_train(resumed_experiment(saved), resume_dir=existing)
    finished_or_cleared(existing, "train")
    return run_train(exp, parent=home, **inputs)


def fold_behaviour_ids(source: Path, ids_dir: Path, folds: int, fold: int, root: Path, home: Path | None) -> Path:
    """Behaviour IDs for a fold retriever: the IDs' source train run retrained without the fold's
    users, then clustered with the ids run's own settings (``home``: a stage directory for both;
    an earlier attempt's runs there are reused or continued, ``train_or_resume``)."""
    from pipelines.ids_stage import run_ids

    sexp, ssaved = retriever_experiment(source)
    train_dir = train_or_resume(without_fold(sexp, folds, fold), home, data_dir=Path(ssaved["data_dir"]),
                                ids_dirs=ids_runs_of(ssaved) or None)
    done = None if home is None else finished_or_cleared(home / "ids", "ids")
    if done is not None:
        return done
    ids_exp = experiment_from_dict({"ids": read_json(Path(ids_dir) / CONFIG_FILE)["ids"], "run": {"root": str(root)}})
    return run_ids(ids_exp, parent=home, train_dir=train_dir)


def fold_refit_sources(saved: dict, examples_last: int) -> dict[str, Path]:
    """The behaviour ID spaces of a retriever (its config.json) whose source trained on the last
    ``examples_last`` transitions of some user, so each fold needs its own -> their source runs."""
    return {space: source for space, source in behaviour_sources(saved).items()
            if retriever_experiment(source)[0].trainer.data.drop_last_transitions < examples_last}


def run_fold_retrievers(retriever_dir: Path, folds: int, parent: Path | None = None, examples_last: int = 1,
                        resume: bool = False) -> list[Path]:
    """One retriever per user fold, each trained as ``retriever_dir`` was (its saved config, data
    and ID runs) without that fold's users. Content IDs are shared. Behaviour IDs (clustered from a
    train run's item vectors, ``behaviour_sources``) learned from the fold's users too, unless their
    source left each user's last ``examples_last`` transitions out: each fold then gets its own,
    from the source retrained without the fold (``fold_behaviour_ids``).

    ``parent`` gets a directory per fold and ``FOLDS_FILE``. ``resume``: ``parent`` is such a
    directory from an interrupted attempt, made for the same retriever, folds and examples; its
    finished runs are reused and its unfinished ones continued (``train_or_resume``)."""
    rexp, saved = retriever_experiment(retriever_dir)
    if rexp.trainer.selection.refit:
        raise ValueError(f"the retriever {retriever_dir} is a refit (trained on validation targets too); fold "
                         "retrievers train on training transitions only: give a retriever selected on validation")
    if resume and parent is None:
        raise ValueError("resuming fold retrievers needs the directory of the interrupted attempt")
    made_for = {"retriever": str(Path(retriever_dir).resolve()), "folds": folds, "examples_last": examples_last}
    if parent is not None:
        if resume:
            found = read_json(Path(parent) / FOLDS_FILE)
            if found != made_for:
                raise ValueError(f"{parent} holds fold retrievers made for {found}, not {made_for}")
        else:
            write_json(Path(parent) / FOLDS_FILE, made_for)
    shared, refit = ids_runs_of(saved), fold_refit_sources(saved, examples_last)
    dirs = []
    for fold in range(folds):
        home = None
        if parent is not None:  # a stage directory per fold: each holds its own train/
            home = Path(parent) / f"fold{fold}"
            home.mkdir(exist_ok=resume)
        ids_dirs = dict(shared)
        for space, source in refit.items():
            where = None if home is None else home / f"behavior-{space}"
            ids_dirs[space] = fold_behaviour_ids(source, Path(shared[space]), folds, fold, rexp.run.root, where)
        dirs.append(train_or_resume(without_fold(rexp, folds, fold), home, data_dir=Path(saved["data_dir"]),
                                    ids_dirs=ids_dirs))
    return dirs


def run_fold_candidates(retriever_dir: Path, fold_dirs: list[Path], last: int, top_n: int,
                        parent: Path | None = None) -> tuple[Path, dict]:
    """A candidates run whose valid and test sets come from ``retriever_dir`` and whose train set
    holds each user's last ``last`` training transitions, each scored by the fold retriever that
    never saw the user (``fold_dirs[f]`` left fold f out)."""
    from pipelines.stages import run_candidates

    cand_dir, metrics = run_candidates(Path(retriever_dir), top_n, splits=("valid", "test"), parent=parent)
    clear_complete(cand_dir)  # finished once the fold retrievers' train split is in
    config = read_json(cand_dir / CONFIG_FILE)
    split = leave_one_out(InteractionData.load(config["data_dir"]), config["max_history"])
    examples = split.training_transitions(last)
    fold = user_folds(examples.user_index, len(fold_dirs))
    items = np.zeros((len(examples), top_n), dtype=np.int64)
    scores = np.zeros((len(examples), top_n), dtype=np.float32)
    for f, fold_dir in enumerate(fold_dirs):
        rows = np.flatnonzero(fold == f)
        trained = read_json(Path(fold_dir) / CONFIG_FILE)["trainer"]["data"]
        if (trained["folds"], trained["fold"]) != (len(fold_dirs), f):
            raise ValueError(f"{fold_dir} left out fold {trained['fold']} of {trained['folds']}, not fold {f} of "
                             f"{len(fold_dirs)}")
        found = retrieve(load_model(Path(fold_dir) / "checkpoints" / "best"),
                         histories_inputs(examples.subset(rows), config["max_history"]), top_n,
                         exclude_history=config["exclude_history"])
        items[rows], scores[rows] = found.candidates, found.scores
    train = CandidateSet(examples.user_index, items, scores, examples.targets)
    train.save(cand_dir / candidates_file("train"))
    metrics["train"] = candidate_metrics(train, top_n)
    write_json(cand_dir / CONFIG_FILE, {**config, "splits": ["train", *config["splits"]],
                                        "train_examples": {"folds": len(fold_dirs), "last": last,
                                                           "fold_train_dirs": [str(d) for d in fold_dirs]}})
    write_json(cand_dir / METRICS_FILE, {**read_json(cand_dir / METRICS_FILE), "train": metrics["train"]})
    mark_complete(cand_dir, "candidates")
    return cand_dir, metrics


def run_rank(exp: ExperimentConfig, retriever_dir: Path, top_n: int = 100,
             parent: Path | None = None, folds: int = 0, fold_examples: int = 5,
             candidates_dir: Path | None = None, vectors_from: Path | None = None,
             resume_dir: Path | None = None) -> tuple[Path, dict]:
    """The cascade: the retriever's candidates, the ranker trained on them, test scored once.
    ``folds`` >= 2: the ranker's examples come from fold retrievers (see the module docstring).
    ``candidates_dir``: a candidates run of this retriever made before (e.g. by
    ``run_fold_candidates``), shared by several rankers; its own train examples then apply.
    ``vectors_from``: a retriever run trained without the examples' transitions, whose item table
    gives the ranker's frozen item vectors (``require_vectors_run``). ``resume_dir``: used by
    ``resume_rank`` only."""
    from pipelines.stages import run_candidates

    require_ranker(exp)
    if folds and folds < 2:
        raise ValueError(f"--folds {folds} is out of range; allowed: 0 (holdout) or >= 2")
    if folds and fold_examples < 1:
        raise ValueError(f"--fold-examples {fold_examples} is out of range; allowed: >= 1 transitions per user")
    if candidates_dir is not None:
        cand_config = read_json(require_complete(Path(candidates_dir), "candidates") / CONFIG_FILE)
        if Path(cand_config["train_dir"]).resolve() != Path(retriever_dir).resolve() or cand_config["top_n"] != top_n:
            raise ValueError(f"{candidates_dir} holds the top {cand_config['top_n']} of {cand_config['train_dir']}, "
                             f"not the top {top_n} of {retriever_dir}")
        examples = cand_config.get("train_examples")
        folds, fold_examples = (examples["folds"], examples["last"]) if examples else (0, fold_examples)
    if not folds:
        require_holdout(Path(retriever_dir))
    if vectors_from is not None:  # before any training: a wrong run fails in seconds, not after the folds
        require_vectors_run(Path(vectors_from), Path(retriever_dir), fold_examples if folds else 1)
    start = time.perf_counter()
    resume = resume_dir is not None
    if resume:
        run_dir = Path(resume_dir).resolve()
    else:
        run_dir = stage_run_dir(exp.run.root, "rank", exp.run.name or exp.model_name, parent)
        write_json(run_dir / RANK_REQUEST, {
            "ranker": exp.to_dict(), "retriever_dir": str(Path(retriever_dir).resolve()), "top_n": top_n,
            "folds": folds, "fold_examples": fold_examples,
            "candidates_dir": None if candidates_dir is None else str(Path(candidates_dir).resolve()),
            "vectors_from": None if vectors_from is None else str(Path(vectors_from).resolve())})
    made = finished_or_cleared(run_dir / "candidates", "candidates") if resume else None
    if candidates_dir is not None:
        cand_dir, cand_metrics = Path(candidates_dir), read_json(Path(candidates_dir) / METRICS_FILE)
    elif made is not None:
        cand_dir, cand_metrics = made, read_json(made / METRICS_FILE)
    elif folds:
        fold_dirs = run_fold_retrievers(Path(retriever_dir), folds, parent=run_dir, examples_last=fold_examples,
                                        resume=resume)
        cand_dir, cand_metrics = run_fold_candidates(Path(retriever_dir), fold_dirs, fold_examples, top_n,
                                                     parent=run_dir)
    else:
        cand_dir, cand_metrics = run_candidates(Path(retriever_dir), top_n, parent=run_dir)
    train_dir = finished_or_cleared(run_dir / "train", "train") if resume else None
    if train_dir is None:
        train_dir = run_train_ranker(exp, cand_dir, parent=run_dir, vectors_dir=vectors_from)
    cand_config = read_json(cand_dir / CONFIG_FILE)
    split = leave_one_out(InteractionData.load(cand_config["data_dir"]), cand_config["max_history"])
    model = load_model(train_dir / "checkpoints" / "best")
    test, histories = CandidateSet.load(cand_dir / candidates_file("test")), split.full_histories("test")
    scores = ranker_scores(model, test, histories)
    long_rows = test.rows_longer_than(histories, cand_config["max_history"])
    base = test.scores.astype(np.float64)
    diff = per_user_ndcg10(scores, test) - per_user_ndcg10(base, test)
    metrics = {
        "valid": read_json(train_dir / METRICS_FILE)["valid"],
        "test": ranker_figures(scores, test),
        "retriever": {"valid": retriever_alone(CandidateSet.load(cand_dir / candidates_file("valid"))),
                      "test": retriever_alone(test)},
        "test_long_history": {"users": int(len(long_rows)),
                              "ranker": ranker_figures(scores[long_rows], test.subset(long_rows)),
                              "retriever": retriever_alone(test.subset(long_rows))},
        "test_ndcg@10_gain": {"mean": float(diff.mean()), "paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))},
        "candidates": cand_metrics, "top_n": top_n, "wall_s": round(time.perf_counter() - start, 2),
    }
    write_json(run_dir / CONFIG_FILE, {**exp.to_dict(), "retriever_dir": str(retriever_dir), "top_n": top_n,
                                       "candidates_dir": str(cand_dir), "train_dir": str(train_dir),
                                       "ranker_examples": {"folds": folds, "last": fold_examples} if folds
                                       else "holdout", "item_vectors_dir": read_json(train_dir / CONFIG_FILE)["item_vectors_dir"]})
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# rank: {exp.model_name} over the top {top_n} of {Path(retriever_dir).name}", "",
        results_table({"retriever alone (test)": metrics["retriever"]["test"],
                       "retriever + ranker (test)": metrics["test"]}),
        "", f"- test NDCG@10 gain {diff.mean():+.4f} (paired SE {metrics['test_ndcg@10_gain']['paired_se']:.4f})",
        f"- AUC {metrics['test']['auc']:.4f} / GAUC {metrics['test']['gauc']:.4f} (retriever's scores: "
        f"{metrics['retriever']['test']['auc']:.4f} / {metrics['retriever']['test']['gauc']:.4f})",
        f"- users with more than {cand_config['max_history']} prior items: {len(long_rows)}", ""]))
    mark_complete(run_dir, "rank")
    return run_dir, metrics


def resume_rank(run_dir: Path) -> tuple[Path, dict]:
    """Continue a ``recsys rank`` run that was interrupted, with the inputs it was started with: its
    finished stages are reused, an unfinished fold retriever continues from its last checkpoint,
    and unfinished candidates or ranker training start over (``recsys rank --resume RUN``)."""
    run_dir = Path(run_dir).resolve()
    if (run_dir / COMPLETE_FILE).is_file():
        raise ValueError(f"{run_dir} is a finished rank run; nothing to resume")
    if not (run_dir / RANK_REQUEST).is_file():
        raise FileNotFoundError(f"{run_dir} holds no {RANK_REQUEST}: it is not a `recsys rank` run started by this "
                                "version, so its inputs are unknown; start the cascade again")
    asked = read_json(run_dir / RANK_REQUEST)
    optional = lambda key: None if asked[key] is None else Path(asked[key])  # noqa: E731
    return run_rank(experiment_from_dict(asked["ranker"]), Path(asked["retriever_dir"]), asked["top_n"],
                    folds=asked["folds"], fold_examples=asked["fold_examples"],
                    candidates_dir=optional("candidates_dir"), vectors_from=optional("vectors_from"), resume_dir=run_dir)
