"""The per-worker training loop and what it runs on: the schedule, the session (Ray or local checkpoints),
TensorBoard events."""
