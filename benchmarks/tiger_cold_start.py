"""Cold-start slice for TIGER: hold items out of training entirely, register them after training
from their content alone, and measure Recall/NDCG on the test users whose target is one of them.

    python benchmarks/tiger_cold_start.py --data DATA_RUN --embed EMBED_RUN [--fraction 0.05] \
        configs/beauty-tiger.yaml [key=value ...]

What is held out: a random ``--fraction`` of the items (seeded). They are absent from the
semantic-ID fit (the RQ-VAE or k-means never sees their vectors), from every training window
and from the validation users the checkpoint is selected on. After training they get IDs
from the fitted tokenizer (content codes + the next free collision code, as
``recsys.catalog.ItemCatalog.register`` does; their vectors come from the embed run, the same
encoder the catalogue would call), are registered in the model and become decodable.

Reported on test, full ranking over all items (warm and cold):
- ``cold``: users whose test target is a held-out item. Before registration no model can return
  those items, so any hit here comes from registration;
- ``warm``: the other users, for reference;
- for TIGER, both ``model.collision_scoring`` modes: ``learned`` (the collision token's own
  log-probability; a held-out item's token was never a target) and ``content``;
- ``content_knn`` on both slices: a model-free baseline ranking items by cosine similarity of
  their content vector to the last history item's.
Writes benchmarks/results/tiger/<dataset>/cold-start.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, protocol, write_record  # noqa: E402
from pipelines.cli import split_config_args  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import ColdStartSplit, EvalSet, cold_start_split  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.metrics import DEFAULT_KS, RankingMetrics  # noqa: E402
from recsys.models import IdTable  # noqa: E402
from recsys.reporting import results_table  # noqa: E402
from recsys.runs import new_run_dir, write_json  # noqa: E402
from recsys.semantic_ids.build import build_index, fit_in_process  # noqa: E402
from recsys.text.store import load_embeddings  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import evaluate  # noqa: E402
from recsys.training.session import train_in_process  # noqa: E402


def content_knn(vectors: np.ndarray, eval_set: EvalSet, ks=DEFAULT_KS) -> dict[str, float]:
    """Rank all items by inner product (unit vectors: cosine) with the last history item's vector.
    ``vectors`` (n_items, D) by item id - 1. The query item itself is excluded."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    last = eval_set.histories[:, -1]  # left-padded: the newest item is last
    _, found = index.search(np.ascontiguousarray(vectors[last - 1]), max(ks) + 1)
    items = torch.from_numpy(found + 1)
    keep = items != torch.from_numpy(last)[:, None]
    top = torch.stack([row[mask][: max(ks)] for row, mask in zip(items, keep)])
    metrics = RankingMetrics(ks)
    metrics.update(top, torch.from_numpy(eval_set.targets))
    return metrics.summary()


def hold_out(data_dir: Path, embed_dir: Path, fraction: float, seed: int,
             max_history: int) -> tuple[InteractionData, np.ndarray, ColdStartSplit, np.ndarray]:
    """A seeded ``fraction`` of the items held out: the data, the held-out (original) item ids, the
    split without them, and the embed run's vectors renumbered (row r = item r + 1 in the split's
    numbering: warm items first, then the held-out ones)."""
    data = InteractionData.load(data_dir)
    item_ids, vectors = load_embeddings(embed_dir)  # ids 1..N in order
    if len(item_ids) != data.n_items:
        raise ValueError(f"{embed_dir} has {len(item_ids)} items, {data_dir} has {data.n_items}")
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(np.arange(1, data.n_items + 1), round(fraction * data.n_items), replace=False))
    cs = cold_start_split(data, max_history, held)
    by_new_id = np.empty_like(vectors)
    by_new_id[cs.new_id[item_ids] - 1] = vectors
    print(f"held out {len(held)} of {data.n_items} items; cold test users {len(cs.cold_test)}, "
          f"warm {len(cs.warm_test)}", flush=True)
    return data, held, cs, by_new_id


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a `recsys data` run")
    parser.add_argument("--embed", type=Path, required=True, help="a `recsys embed` run over the same items")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of items held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    ns, rest = parser.parse_known_args(argv)
    if not 0 < ns.fraction < 1:
        parser.error(f"--fraction={ns.fraction} is out of range; allowed: 0 < fraction < 1")
    exp = load_experiment(*split_config_args([*rest, "trainer.resources.use_ray=false"]))
    start = time.perf_counter()

    data, held, cs, by_new_id = hold_out(ns.data, ns.embed, ns.fraction, ns.seed, exp.data.max_history)
    warm_vectors, cold_vectors = by_new_id[:cs.n_warm], by_new_id[cs.n_warm:]

    tokenizer = fit_in_process(exp.ids, warm_vectors)
    index = build_index(np.arange(1, cs.n_warm + 1), tokenizer, warm_vectors)
    context = {"ids": {"semantic": IdTable.from_index(index, cs.n_warm)}}
    run_dir = new_run_dir(exp.run.root, "train", "cold-start")
    write_json(run_dir / "config.json", {**exp.to_dict(), "data_dir": str(Path(ns.data).resolve()),
                                         "held_out": held.tolist()})
    state = train_in_process(exp, cs.warm, run_dir, context=context)
    model = load_model(run_dir / "checkpoints" / "best")

    cold_ids = np.arange(cs.n_warm + 1, cs.n_items + 1)
    full_ids = index.add_many(cold_ids, tokenizer.encode(cold_vectors))  # content codes + collision code
    model.register_items(cold_ids, {"semantic": full_ids})
    ev = dict(batch_size=exp.eval.batch_size, exclude_history=exp.eval.exclude_history)
    results = {}
    for scoring in ("learned", "content"):  # see TigerConfig.collision_scoring
        model.config.collision_scoring = scoring
        results[f"tiger_{scoring}"] = {"cold": evaluate(model, cs.cold_test, **ev),
                                       "warm": evaluate(model, cs.warm_test, **ev)}
    results["content_knn"] = {"cold": content_knn(by_new_id, cs.cold_test), "warm": content_knn(by_new_id, cs.warm_test)}
    print(results_table({f"{name} {s}": m for name, slices in results.items() for s, m in slices.items()}))

    new_tuple = float((full_ids[:, -1] == 0).float().mean())
    write_record("cold-start", model="tiger", dataset=dataset_name(exp.to_dict()["data"]),
                 protocol=protocol(exclude_history=exp.eval.exclude_history), config=exp.to_dict(), wall_s=time.perf_counter() - start,
                 metrics=results,
                 extra={"held_out_items": len(held), "n_items": data.n_items, "fraction": ns.fraction,
                        "seed": ns.seed, "cold_test_users": len(cs.cold_test), "warm_test_users": len(cs.warm_test),
                        "cold_items_on_a_new_content_tuple": round(new_tuple, 4),
                        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "train_run": str(run_dir)})


if __name__ == "__main__":
    main(sys.argv[1:])
