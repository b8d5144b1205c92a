#!/bin/bash
# Train several AFA configurations on the synthetic benchmark side by side (one GPU or a
# large CPU), then score each with benchmarks/synthetic_proxy.py, also with a perfect
# affinity (--oracle-affinity). Produced the tables of docs/synthetic.md.
#
#   bash benchmarks/synthetic_sweep.sh NAME "hydra overrides" 'SPEC_JSON' [NAME "…" '…' …]
#   bash benchmarks/synthetic_sweep.sh s8 "model.strides=[4,2,1,1]" '{}' t1 "" '{"mark_tint": 1.0}'
#
# SPEC_JSON overrides SyntheticSpec fields for both train and val ('{}': the default
# benchmark). Results go to $OUT (default runs/sweep): NAME.log, NAME.proxy, summary.txt.
# NOPROXY=1 skips the scoring; WHEELS=dir installs the wheels there first (--no-deps).
set -u
if [ $# -eq 0 ] || [ $(($# % 3)) -ne 0 ]; then
  echo "usage: bash benchmarks/synthetic_sweep.sh NAME \"hydra overrides\" 'SPEC_JSON' [...] (three arguments per run)" >&2
  exit 2
fi
OUT=${OUT:-runs/sweep}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python -m pip install --no-deps --no-index -q "$WHEELS"/*.whl || exit 1
fi
export WANDB_ERROR_REPORTING=false
while [ $# -gt 0 ]; do
  name=$1; overrides=$2; spec=$3; shift 3
  if [ "$spec" != "{}" ]; then  # hydra's dict syntax: the JSON without quotes
    hydra_spec=$(echo "$spec" | tr -d '" ')
    overrides="$overrides +dataset.train.spec=$hydra_spec +dataset.val.index.spec=$hydra_spec"
  fi
  (
    python train.py logger=none run_name="$name" dataset.root="/tmp/synthetic-$name" \
      train.num_workers=3 eval.num_workers=2 $overrides > "$OUT/$name.log" 2>&1
    touch "$OUT/$name.proxy"
    [ -n "${NOPROXY:-}" ] && exit 0
    checkpoint=runs/$name/checkpoints/last.pt
    python benchmarks/synthetic_proxy.py "$checkpoint" --num 300 --spec "$spec" > "$OUT/$name.proxy" 2>&1
    echo "with a perfect affinity:" >> "$OUT/$name.proxy"
    python benchmarks/synthetic_proxy.py "$checkpoint" --num 300 --spec "$spec" --oracle-affinity \
      2>&1 | sed -n 2p >> "$OUT/$name.proxy"
  ) &
done
wait
for log in "$OUT"/*.log; do
  echo "== $(basename "$log" .log)"
  grep -E "validation|Error" "$log" | tail -2
  cat "${log%.log}.proxy"
done > "$OUT/summary.txt"
cat "$OUT/summary.txt"
