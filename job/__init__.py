"""charlstm: character-level LSTM text generation as a distributed Ray Train batch job."""

__version__ = "0.1.0"
