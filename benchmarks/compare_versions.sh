#!/bin/bash
# pretune at two commits, the same training command, alternating, on the same machine:
#   benchmarks/compare_versions.sh OLD_COMMIT REPEATS -- pretrain recipes/text-mlm.yaml backbone.size=mini ...
# Each version runs from a git worktree of its commit (PYTHONPATH=<worktree>/src, the current venv);
# the median tokens/s and examples/s of the train lines after the first are printed per run.
set -euo pipefail
old=$1; repeats=$2; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)/old
git -C "$here" worktree add -f "$tree" "$old" >/dev/null
trap 'git -C "$here" worktree remove --force "$tree"' EXIT
out=$(mktemp -d)
for rep in $(seq 1 "$repeats"); do
  for which in old new; do
    src=$here/src; dir=$here
    if [ $which = old ]; then src=$tree/src; dir=$tree; fi
    (cd "$dir" && PYTHONPATH=$src "$here/.venv/bin/python" -m pretune "$@" trainer.progress=false trainer.tensorboard=false \
        run_dir="$out/$which-$rep" > "$out/$which-$rep.log" 2>&1)
    "$here/.venv/bin/python" - "$out/$which-$rep/metrics.jsonl" "$which" "$rep" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"train"' in line][1:]
print(sys.argv[2], sys.argv[3], "tokens/s", round(statistics.median(r["tokens_per_s"] for r in rows)),
      "examples/s", round(statistics.median(r["examples_per_s"] for r in rows), 1))
PY
  done
done
