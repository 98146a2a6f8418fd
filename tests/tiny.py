"""Settings of the tiny training runs the tests make: seconds on two cores, yet every code path of a real run."""

TINY = {"units": [16], "embed_dim": 8, "batch_size": 4, "seq_len": 20, "sample_chars": 20, "steps_per_call": 2}
# Dropout-free: runs on 1 and 2 workers, or interrupted and not, are comparable step by step.
EXACT = {**TINY, "dropout": 0.0, "input_dropout": 0.0}
