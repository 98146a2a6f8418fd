"""`python -m job.generate`: settings, the plan of shards, the shards and manifest in --output, and the workers that
generate them."""
