"""charlstm: character-level LSTM text generation as a distributed Ray Train batch job."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (CPU feature notices, oneDNN banners) drowns our one-line logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
