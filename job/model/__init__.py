"""The model: the Keras builders, sampling, the exported model folder, the checkpoint format, fine-tuning from a
parent, held-out scoring."""
