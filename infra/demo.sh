#!/usr/bin/env bash
# `make demo`: a local S3 server and a 3-node Ray cluster on 127.0.0.1 (a head that runs no work + two 2-CPU
# worker nodes), Alice uploaded, a short 2-worker training job (one worker per node), an evaluation and a
# 2-worker generation job sent with `ray job submit`, results listed, the stack stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RAY=.venv/bin/ray
BUCKET=charlstm-local
STATE=.stack/demo

corpus="${CORPUS:-}"
if [ -z "$corpus" ]; then
  corpus=.stack/pg11.txt
  if [ ! -s "$corpus" ]; then
    echo "== downloading Alice in Wonderland from Project Gutenberg (set CORPUS=path to skip)"
    mkdir -p .stack
    # Offline: one line, then a corpus of invented prose the project writes itself (infra/demo_corpus.py).
    corpus=$($PY -m infra.demo_corpus "$corpus")
  fi
fi
[ -s "$corpus" ] || { echo "error: CORPUS=$corpus does not exist or is empty" >&2; exit 2; }

echo "== starting the local stack (moto S3 + a Ray head and two worker nodes on 127.0.0.1)"
$PY -m infra.localstack start --state-dir "$STATE" --bucket "$BUCKET" --upload "$corpus" corpora/wonderland.txt \
  --worker-nodes 2 --num-cpus 2
trap '$PY -m infra.localstack stop --state-dir "$STATE"' EXIT
eval "$($PY -m infra.localstack env --state-dir "$STATE")"

echo "== training: ray job submit (2 workers, one per node, default preset, a few minutes at most)"
$RAY job submit --working-dir . -- python -m job.train \
  --corpus "s3://$BUCKET/corpora/wonderland.txt" --output "s3://$BUCKET/runs/demo" \
  --num-workers 2 --placement-strategy SPREAD --epochs 30 --max-minutes 3 --run-name demo

echo "== held-out evaluation: ray job submit"
$RAY job submit --working-dir . -- python -m job.evaluate \
  --model "s3://$BUCKET/runs/demo" --corpus "s3://$BUCKET/corpora/wonderland.txt"

echo "== batch generation: ray job submit (2 workers, 200 samples x 300 chars)"
$RAY job submit --working-dir . -- python -m job.generate \
  --model "s3://$BUCKET/runs/demo" --output "s3://$BUCKET/generations/demo" \
  --num-samples 200 --length 300 --temperature 0.8 --top-p 0.95 --num-workers 2 --shard-size 50 --seed 1

echo "== what landed in the bucket"
$PY - "$BUCKET" <<'PY'
import sys
from job.core import storage
root = f"s3://{sys.argv[1]}/runs/demo"
for url in storage.listdir(root):
    print("  ", url)
samples = [u for u in storage.listdir(root + "/samples")]
print("\n== sample text from the last epoch (", samples[-1], ")\n")
print(storage.read_text(samples[-1]))
gen = f"s3://{sys.argv[1]}/generations/demo"
for url in storage.listdir(gen):
    print("  ", url)
from job.generate import read_shard
first = read_shard(gen + "/samples/part-00000.jsonl.gz")[0]
print("\n== generated sample 0 (prompt | continuation)\n")
print(first["prompt"] + " | " + first["text"])
PY
