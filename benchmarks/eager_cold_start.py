"""Cold-start slice for EAGER: hold items out of everything that trains (the behaviour model, both
ID fits, EAGER itself, its selection), register them after training from their content alone,
and measure Recall/NDCG on the test users whose target is one of them, under every fusion.

    python benchmarks/eager_cold_start.py --data DATA_RUN --embed EMBED_RUN [--fraction 0.05] \
        [--warm-users 3000] configs/beauty-eager.yaml [key=value ...]

The counterpart of ``benchmarks/tiger_cold_start.py`` (the same split, ``cold_start_split``):
- the behaviour model of ``behavior.config`` (the two-tower, or SASRec) trains on the warm
  split's training transitions; its item table, warm items only, is clustered into the
  behaviour IDs (``exp.ids``, as ``recsys ids --from-train``);
- the warm items' content vectors are clustered into the semantic IDs;
- EAGER trains on the warm split, GCT reading those same vectors, selected on warm validation;
- the held-out items then get semantic codes from the fitted tokenizer (content codes + the next
  free collision code) and are registered: behaviour codes they have none (no interactions), so
  each fusion ranks them by its rule for the stream an item lacks (``recsys/models/eager.py``);
  in a history the encoder reads them by their semantic code tokens.

Reported on test, full ranking over all items (warm and cold), history kept:
- ``cold``: users whose test target is a held-out item (no model trained on them could return it
  before registration);
- ``warm``: a fixed sample of ``--warm-users`` of the other users, for reference;
- per fusion (``sum``, ``confidence``, ``behavior``, ``semantic``) and ``collision_scoring``
  (``learned``, ``content``: a held-out item's collision token was never a target): the behaviour
  stream alone can never return a held-out item, which is the point of that row;
- ``content_knn``: a model-free baseline ranking items by cosine similarity of their content
  vector to the last history item's.
Writes benchmarks/results/eager/<dataset>/cold-start[-<name>].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, machine_note, protocol, write_record  # noqa: E402
from benchmarks.tiger_cold_start import content_knn, hold_out  # noqa: E402
from pipelines.cli import split_config_args  # noqa: E402
from recsys.data.split import EvalSet  # noqa: E402
from recsys.experiment import behavior_experiment, load_experiment  # noqa: E402
from recsys.models import IdTable  # noqa: E402
from recsys.models.eager import FUSIONS  # noqa: E402
from recsys.reporting import results_table  # noqa: E402
from recsys.runs import new_run_dir, write_json  # noqa: E402
from recsys.semantic_ids.build import build_index, fit_in_process  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import evaluate  # noqa: E402
from recsys.training.session import train_in_process  # noqa: E402


def id_table(ids_config, vectors: np.ndarray):
    """Hierarchical k-means (or the configured method) over ``vectors`` (n, D), row i - 1 = item i:
    the fitted tokenizer, its index and the model's table with the vectors (row 0 zeros, for GCT)."""
    tokenizer = fit_in_process(ids_config, vectors)
    index = build_index(np.arange(1, len(vectors) + 1), tokenizer, vectors)
    table = torch.cat([torch.zeros(1, vectors.shape[1]), torch.from_numpy(vectors).float()])
    return tokenizer, index, IdTable.from_index(index, len(vectors))._replace(vectors=table)


def sample(eval_set: EvalSet, n: int, seed: int) -> EvalSet:
    if n <= 0 or n >= len(eval_set):
        return eval_set
    return eval_set.subset(np.sort(np.random.default_rng(seed).choice(len(eval_set), n, replace=False)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a `recsys data` run")
    parser.add_argument("--embed", type=Path, required=True, help="a `recsys embed` run over the same items")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of items held out (default 0.05)")
    parser.add_argument("--warm-users", type=int, default=3000, help="warm test users scored (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="which items are held out, and the warm sample")
    parser.add_argument("--name", default="", help="record cold-start-<name>.json (default cold-start.json)")
    ns, rest = parser.parse_known_args(argv)
    if not 0 < ns.fraction < 1:
        parser.error(f"--fraction={ns.fraction} is out of range; allowed: 0 < fraction < 1")
    exp = load_experiment(*split_config_args([*rest, "trainer.resources.use_ray=false"]))
    if exp.model_name != "eager":
        parser.error(f"the config trains model.name={exp.model_name!r}; this slice is EAGER's "
                     "(benchmarks/tiger_cold_start.py is TIGER's)")
    source = behavior_experiment(exp)
    source.trainer.resources.use_ray = False
    start = time.perf_counter()

    data, held, cs, by_new_id = hold_out(ns.data, ns.embed, ns.fraction, ns.seed, exp.data.max_history)
    warm_vectors, cold_vectors = by_new_id[:cs.n_warm], by_new_id[cs.n_warm:]
    parent = new_run_dir(exp.run.root, "train", "eager-cold-start")
    write_json(parent / "config.json", {**exp.to_dict(), "data_dir": str(Path(ns.data).resolve()),
                                        "embed_dir": str(Path(ns.embed).resolve()), "held_out": held.tolist(),
                                        "behavior_source": source.to_dict()})

    clock = time.perf_counter()
    behaviour_dir = parent / "behavior"
    behaviour_dir.mkdir()
    train_in_process(source, cs.warm, behaviour_dir)
    behaviour_vectors = load_model(behaviour_dir / "checkpoints" / "best").item_embeddings().detach().float().numpy()
    behaviour_s = time.perf_counter() - clock
    _, _, behaviour_ids = id_table(exp.ids, behaviour_vectors)
    tokenizer, semantic_index, semantic_ids = id_table(exp.ids, warm_vectors)

    clock = time.perf_counter()
    eager_dir = parent / "eager"
    eager_dir.mkdir()
    state = train_in_process(exp, cs.warm, eager_dir, context={"ids": {"behavior": behaviour_ids,
                                                                       "semantic": semantic_ids}})
    eager_s = time.perf_counter() - clock
    model = load_model(eager_dir / "checkpoints" / "best")
    cold_ids = np.arange(cs.n_warm + 1, cs.n_items + 1)
    full_ids = semantic_index.add_many(cold_ids, tokenizer.encode(cold_vectors))  # content codes + collision code
    model.register_items(cold_ids, {"semantic": full_ids})

    slices = {"cold": cs.cold_test, "warm": sample(cs.warm_test, ns.warm_users, ns.seed)}
    ev = dict(batch_size=exp.eval.batch_size, exclude_history=exp.eval.exclude_history)
    results = {}
    for scoring in ("learned", "content"):  # EagerConfig.collision_scoring
        for fusion in FUSIONS:
            model.config = dataclasses.replace(model.config, fusion=fusion, collision_scoring=scoring)
            results[f"eager_{fusion}_{scoring}"] = {name: evaluate(model, s, **ev) for name, s in slices.items()}
            print(f"{fusion} {scoring}: cold recall@10 {results[f'eager_{fusion}_{scoring}']['cold']['recall@10']:.4f}",
                  flush=True)
    results["content_knn"] = {name: content_knn(by_new_id, s) for name, s in slices.items()}
    print(results_table({f"{name} {s}": m for name, by_slice in results.items() for s, m in by_slice.items()}))

    new_tuple = float((full_ids[:, -1] == 0).float().mean())
    write_record("cold-start" + (f"-{ns.name}" if ns.name else ""), model="eager",
                 dataset=dataset_name(exp.to_dict()["data"]),
                 protocol=protocol(exclude_history=exp.eval.exclude_history),
                 config={"eager": exp.to_dict(), "behavior_source": source.to_dict()},
                 wall_s=time.perf_counter() - start, metrics=results,
                 extra={"held_out_items": len(held), "n_items": data.n_items, "fraction": ns.fraction, "seed": ns.seed,
                        "cold_test_users": len(cs.cold_test), "warm_test_users": len(cs.warm_test),
                        "warm_users_scored": len(slices["warm"]),
                        "cold_items_on_a_new_content_tuple": round(new_tuple, 4),
                        "behaviour_model_s": round(behaviour_s, 1), "eager_s": round(eager_s, 1),
                        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "train_run": str(parent),
                        "machine_note": machine_note(exp.trainer.resources.threads or torch.get_num_threads())})


if __name__ == "__main__":
    main(sys.argv[1:])
