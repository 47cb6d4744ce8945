#!/bin/bash
# The demo's two models over data seeds 0, 1, 2 (docs/experiments/demo.md): each config as its own
# `recsys pipeline` run at the generator's default size (2,000 users, 500 items, 10 topics), the
# data built from the same seed as the demo would, THREADS training threads (default 1, for a shared
# machine; the demo itself trains with 2).
#   [THREADS=2] benchmarks/demo_seeds.sh [RUN_ROOT]
set -euo pipefail
ROOT=${1:-runs/demo-seeds}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
for SEED in 0 1 2; do
  for M in tiger sasrec; do
    CFG=configs/demo.yaml; [ "$M" = sasrec ] && CFG=configs/demo-sasrec.yaml
    /usr/bin/time -f "TIME $M seed $SEED wall %e user %U sys %S" python -m pipelines.cli pipeline "$CFG" \
      run.root="$ROOT" run.name="$M-s$SEED" trainer.resources.threads="$THREADS" data.format=synthetic \
      data.synthetic.seed="$SEED" data.synthetic.n_users=2000 data.synthetic.n_items=500 data.synthetic.n_topics=10
  done
done
