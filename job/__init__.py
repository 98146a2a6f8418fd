"""charlstm: character-level LSTM text generation as a distributed Ray Train batch job."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (CPU feature notices, oneDNN banners) drowns our one-line logs. Remembered so
# that --verbose (job.core.report.quiet_tensorflow) can take back the level we set, never one the user set.
QUIET_BY_US = "TF_CPP_MIN_LOG_LEVEL" not in _os.environ
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
