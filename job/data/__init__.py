"""The data stage: corpus cleaning and the vocabulary, preparing a corpus into a dataset (and reading it back on a
worker), windows over the encoded text, generation prompts."""
