"""job.cluster.capacity.autoscaler_running on live local Ray heads (127.0.0.1): only an autoscaler that can add
nodes says yes.

Issue 26: the autoscaler-v2 flag in the GCS was taken for "this cluster can grow", but `ray start --head` turns it
on by itself on every KubeRay pod (Ray >= 2.48: RAY_USAGE_STATS_KUBERAY_IN_USE + RAY_CLOUD_INSTANCE_ID +
RAY_NODE_TYPE_NAME, set by KubeRay autoscaling or not), so a fixed KubeRay cluster made a job that cannot fit wait
15 minutes. The three clusters here: a real autoscaler v2 (the fake_multinode provider, which launches local
nodes; `ray.cluster_utils.AutoscalingCluster` does the same but runs `ray stop --force`, which would kill every
Ray on the machine, and needs an example.yaml the wheel lacks), a fixed head with KubeRay's variables, a plain
fixed head. Each head is `ray start --head --block` in its own session (infra.localstack) and is stopped by
process group; each question is asked from a fresh driver process, as a job's driver asks it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infra import localstack

pytestmark = pytest.mark.e2e

REPO_ROOT = localstack.REPO_ROOT
# The monitor reports every AUTOSCALER_UPDATE_INTERVAL_S (5 s by default): 1 s keeps each verdict ~1-2 s.
_FAST_MONITOR = {"AUTOSCALER_UPDATE_INTERVAL_S": "1"}
KUBERAY_POD_ENV = {"RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_CLOUD_INSTANCE_ID": "charlstm-head-x7k2p",
                   "RAY_NODE_TYPE_NAME": "headgroup"}

# A driver on the cluster: the v2 flag as the GCS holds it, then autoscaler_running's verdict for each ask.
_DRIVER = """
import json, sys, time
import ray
from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE, GCS_AUTOSCALER_V2_ENABLED_KEY
from job.cluster.capacity import autoscaler_running
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
gcs = ray._private.worker.global_worker.gcs_client
flag = gcs.internal_kv_get(GCS_AUTOSCALER_V2_ENABLED_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode(), timeout=10)
out = {"v2_flag": flag == b"1", "verdicts": [], "seconds": []}
for bundles in json.loads(sys.argv[2]):
    t0 = time.monotonic()
    out["verdicts"].append(autoscaler_running(bundles, timeout_s=20))
    out["seconds"].append(round(time.monotonic() - t0, 1))
print("RESULT " + json.dumps(out), flush=True)
"""


class Head:
    """`ray start --head --block` on 127.0.0.1 (token auth, no dashboard), every port free; stop() ends its group."""

    def __init__(self, state_dir: Path, extra_env: dict[str, str], extra_args: list[str] = (), num_cpus: int = 1,
                 gcs_port: int | None = None):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = state_dir / localstack.TOKEN_FILE
        localstack._new_token(self.token_path)
        self.temp_dir = tempfile.mkdtemp(prefix="ra-", dir="/tmp")  # short: Ray's unix sockets live under it
        self.gcs_port = gcs_port or localstack.free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        node_args, _ = localstack._node_ports(100)
        argv = [localstack.ray_executable(), "start", "--head", "--block", "--port", str(self.gcs_port),
                "--include-dashboard", "false", "--ray-client-server-port", str(localstack.free_port()),
                *node_args, "--temp-dir", self.temp_dir, "--num-cpus", str(num_cpus), *extra_args]
        env = localstack._ray_env(self.token_path, self.gcs_port, {**_FAST_MONITOR, **extra_env})
        env["AUTOSCALER_METRIC_PORT"] = str(localstack.free_port())  # the monitor's Prometheus port
        env["DASHBOARD_METRIC_PORT"] = str(localstack.free_port())
        self.proc = localstack.spawn("ray-head", argv, env, state_dir / "ray-head.log")

    def ask(self, asks: list[list[dict[str, float]]], timeout: float = 120) -> dict:
        """Run the driver (it waits for the head as ray.init does); its flag and verdicts."""
        env = localstack.scrubbed_environ()
        env.update(localstack.ray_auth_env(self.token_path), RAY_ADDRESS=self.gcs_address, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.run([sys.executable, "-c", _DRIVER, self.gcs_address, json.dumps(asks)], env=env,
                              cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                                                f"--- head ---\n{localstack.log_tail(self.proc.log)}\n"
                                                f"{self.monitor_log()}")
        return json.loads(lines[-1][len("RESULT "):])

    def monitor_log(self, lines: int = 30) -> str:
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        return "\n".join(f"--- {p} ---\n{localstack.log_tail(p, lines)}" for p in sorted(logs.glob("monitor*")))

    def stop(self) -> None:
        self.proc.stop(timeout=5)  # the nodes an autoscaler launched outlive the head's own shutdown: signalled next
        if not os.environ.get("CHARLSTM_KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head(tmp_path):
    started: list[Head] = []

    def start(extra_env: dict[str, str], extra_args: list[str] = (), gcs_port: int | None = None) -> Head:
        h = Head(tmp_path / f"head{len(started)}", extra_env, extra_args, gcs_port=gcs_port)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()
        assert not h.proc.members(), "a process of the head outlived stop()"


def _fake_multinode_config(gcs_address: str) -> dict:
    """What AutoscalingCluster(autoscaler_v2=True) writes: one worker type of 2 CPUs, at most one node of it,
    launched by the fake multi-node provider as local Ray nodes on our GCS."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return {
        "cluster_name": "charlstm-fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        # type "fake_multinode" would read defaults from the example.yaml the wheel lacks; "external" names the same
        # provider class (autoscaler v2 treats both as an unknown provider: no special case for either).
        "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                     "FakeMultiNodeProvider", "gcs_address": gcs_address, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "auth": {"ssh_user": "nobody"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


CPU = {"CPU": 1.0}


def test_an_autoscaler_that_can_add_nodes_says_yes_up_to_its_max(head, tmp_path):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    config = tmp_path / "autoscaling.json"
    gcs_port = localstack.free_port()
    config.write_text(json.dumps(_fake_multinode_config(f"127.0.0.1:{gcs_port}")))
    # Head 1 CPU + at most one 2-CPU node: 3 CPUs is what it can grow to, 4 is past its max.
    h = head({"RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
              "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
             ["--autoscaling-config", str(config)], gcs_port=gcs_port)
    t0 = time.monotonic()
    result = h.ask([[CPU] * 4, [CPU] * 3])
    assert result["v2_flag"]
    assert result["verdicts"] == [False, True], (result, h.monitor_log())
    print(f"autoscaler: {result} in {time.monotonic() - t0:.1f}s")
    # The yes came from an autoscaler that does add nodes: it started one for the ask it could meet.
    deadline = time.monotonic() + 10
    while "Adding 1 node(s) of type ray.worker.cpu" not in h.monitor_log(2000):
        assert time.monotonic() < deadline, h.monitor_log()
        time.sleep(0.5)


def test_a_fixed_kuberay_head_says_no_though_the_v2_flag_is_on(head):
    h = head(KUBERAY_POD_ENV)
    t0 = time.monotonic()
    # 2 CPUs are past the 1-CPU head; 1 CPU it holds: a yes there shows the monitor's own verdicts are read.
    result = h.ask([[CPU] * 2, [CPU]])
    assert result["v2_flag"], "KubeRay's pod variables no longer turn autoscaler v2 on: the case is moot"
    assert result["verdicts"] == [False, True], (result, h.monitor_log())
    assert result["seconds"][0] < 15, result  # the read-only monitor answered; no wait for the timeout
    print(f"fixed KubeRay head: {result} in {time.monotonic() - t0:.1f}s")


def test_a_plain_fixed_head_says_no(head):
    h = head({})
    result = h.ask([[CPU] * 2])
    assert not result["v2_flag"] and result["verdicts"] == [False], result
    assert result["seconds"][0] < 5, result
