"""Ray Train's backend for MultiWorkerMirroredStrategy, without TensorFlow in the driver or the controller.

Ray's `TensorflowTrainer` does one thing on top of the generic data-parallel trainer: before train_func runs,
it puts a TF_CONFIG naming every worker's address into each worker's environment. But `ray.train.tensorflow`
imports TensorFlow at module level, so the driver and Ray Train's controller actor (which unpickles the
backend config) each loaded all of TensorFlow — seconds of start-up and memory in two processes that never run
a TensorFlow op, and TensorFlow's start-up notices from each. This backend sets the same TF_CONFIG and nothing
else (Ray's also sets TF_USE_LEGACY_KERAS, which only matters to `tf.keras`; we use Keras 3 directly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig


def tf_config(worker_addresses: list[str], index: int) -> dict[str, Any]:
    """The cluster spec MultiWorkerMirroredStrategy reads: every worker's address, and which one this is."""
    return {"cluster": {"worker": list(worker_addresses)}, "task": {"type": "worker", "index": index}}


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps(tf_config(worker_addresses, index))


def _worker_address() -> str:
    return build_address(*get_address_and_port())


class _MirroredBackend(Backend):
    def on_start(self, worker_group, backend_config: MirroredConfig) -> None:
        addresses = worker_group.execute(_worker_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, worker_addresses=addresses, index=i)
                 for i in range(len(worker_group))])


@dataclass
class MirroredConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _MirroredBackend

    @property
    def framework(self):
        try:  # shown as TensorFlow in Ray's dashboard / state export, as TensorflowTrainer's runs are
            from ray.train.v2._internal.util import TrainingFramework

            return TrainingFramework.TENSORFLOW
        except ImportError:
            return None
