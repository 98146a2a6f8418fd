"""job.drain_node, the worker pods' preStop hook, on a live loopback cluster (a head + one worker node).

The worker node is started as KubeRay starts a worker pod's (RAY_CLOUD_INSTANCE_ID = the pod's name) and the
command runs with that node's environment, as the hook does inside the pod. A driver on the cluster keeps two
actors on the node: a plain one (so the raylet is not idle: a draining idle raylet exits at once) and one of class
RayTrainWorker, Ray Train V2's worker actor. The drain must be visible to the driver as Ray Train's
PreemptionWatcher reads it (`ray._private.state.state.get_draining_nodes()`), with the deadline asked for; the
command must wait while the train worker is there and return within a poll once it is gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from infra import localstack
from job import drain_node

pytestmark = pytest.mark.e2e

REPO_ROOT = localstack.REPO_ROOT
POD_NAME = "charlstm-train-raycluster-gpu-worker-x7k2p"
DEADLINE_S = 30

# Places the two actors on the worker node, then answers one command per stdin line with one JSON line.
_DRIVER = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
on_node = NodeAffinitySchedulingStrategy(node_id=sys.argv[2], soft=False)

@ray.remote(num_cpus=1)
class Holder:
    def ping(self):
        return 1

@ray.remote(num_cpus=1)
class RayTrainWorker:
    def ping(self):
        return 1

holder = Holder.options(scheduling_strategy=on_node).remote()
worker = RayTrainWorker.options(scheduling_strategy=on_node).remote()
ray.get([holder.ping.remote(), worker.ping.remote()], timeout=60)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() == "draining":
        print(json.dumps(ray._private.state.state.get_draining_nodes()), flush=True)
    elif line.strip() == "kill-train-worker":
        ray.kill(worker)
        print(json.dumps({"killed": True}), flush=True)
"""


def _node_env(head: localstack.RayInfo) -> dict[str, str]:
    """The worker node's environment (infra.localstack._ray_env), as a preStop hook inherits its container's."""
    env = localstack._ray_env(head.token_path, head.gcs_address.rsplit(":", 1)[1], {"RAY_CLOUD_INSTANCE_ID": POD_NAME})
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


class Driver:
    def __init__(self, head: localstack.RayInfo, node_id: str):
        env = localstack.scrubbed_environ()
        env.update(localstack.ray_auth_env(head.token_path), RAY_ADDRESS=head.gcs_address, PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", _DRIVER, head.gcs_address, node_id], env=env,
                                     cwd=str(REPO_ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self._answer() == {"ready": True}

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the driver exited ({self.proc.poll()})"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def cluster(tmp_path):
    head = localstack.start_ray_head(tmp_path, num_cpus=0, multi_node=True, timeout=60)
    node = None
    try:
        node = localstack.start_ray_node(head, tmp_path, "gpu", num_cpus=2,
                                         extra_env={"RAY_CLOUD_INSTANCE_ID": POD_NAME}, timeout=60)
        yield head, node
    finally:
        if node is not None:
            node.stop()
        localstack.stop_ray_head(head)


def test_the_hook_drains_its_own_node_as_preempted_and_waits_for_the_train_workers(cluster):
    head, node = cluster
    driver = Driver(head, node.node_id)
    hook = None
    try:
        assert driver.ask("draining") == {}
        launched = time.time()
        hook = subprocess.Popen([sys.executable, "-m", "job.drain_node", "--deadline-seconds", str(DEADLINE_S)],
                                env=_node_env(head), cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        draining: dict = {}
        limit = time.monotonic() + 20
        while not draining and time.monotonic() < limit and hook.poll() is None:
            time.sleep(0.25)
            draining = driver.ask("draining")
        seen = time.time()
        # Only the worker node, with the deadline the hook was given (Ray Train's watcher reads exactly this).
        assert set(draining) == {node.node_id}, (draining, hook.poll())
        deadline_s = draining[node.node_id] / 1000
        assert launched + DEADLINE_S - 1 <= deadline_s <= seen + DEADLINE_S + 1

        # The train worker is still there: the hook waits for it.
        time.sleep(2)
        assert hook.poll() is None, hook.communicate()
        assert driver.ask("kill-train-worker") == {"killed": True}
        gone = time.monotonic()
        out, err = hook.communicate(timeout=15)
        returned_after = time.monotonic() - gone
        assert hook.returncode == 0, (out, err)
        assert returned_after < 5, returned_after  # one poll (1 s) + a GCS round trip, not the deadline
        lines = out.strip().splitlines()
        assert "drained as preempted" in lines[0] and POD_NAME in lines[0], out
        assert "no Ray Train worker is left" in lines[-1] or "has left the cluster" in lines[-1], out
        assert "Traceback" not in err, err
    finally:
        if hook is not None and hook.poll() is None:
            hook.kill()
            hook.wait(timeout=5)
        driver.stop()


# --------------------------------------------------------------------------------------------- failure paths


@pytest.mark.parametrize("address", ["", "unreachable"])
def test_without_a_reachable_ray_it_says_one_line_and_exits_0_at_once(address):
    env = localstack.scrubbed_environ()
    env["PYTHONPATH"] = str(REPO_ROOT)
    if address == "unreachable":
        env["RAY_ADDRESS"] = f"127.0.0.1:{localstack.free_port()}"  # free: nothing listens there
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "job.drain_node", "--deadline-seconds", "600"], env=env,
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc
    assert len(proc.stdout.strip().splitlines()) == 1 and proc.stdout.startswith("drain_node: "), proc.stdout
    assert "nothing done" in proc.stdout
    assert not proc.stderr.strip(), proc.stderr  # no traceback, no Ray log lines
    assert took < 15, took  # not Ray's 40 s wait for a GCS it cannot reach, nor the deadline


class _FakeGcs:
    """A node that stays alive with one train worker forever: only the deadline ends the wait."""

    def get_all_node_info(self, timeout=None, state_filter=None):
        node = type("N", (), {"node_id": bytes.fromhex("ab" * 28)})()
        return {"n": node}

    async def async_get_all_actor_info(self, actor_state_name=None, timeout=None):
        address = type("A", (), {"node_id": bytes.fromhex("ab" * 28)})()
        return {"a": type("T", (), {"class_name": "RayTrainWorker", "address": address})()}


def test_the_wait_ends_at_the_deadline(monkeypatch):
    monkeypatch.setattr(drain_node, "POLL_SECONDS", 0.05)
    started = time.monotonic()
    outcome = drain_node.wait_for_train_workers(_FakeGcs(), "ab" * 28, started + 0.3)
    assert "deadline reached with 1 Ray Train worker(s)" in outcome
    assert 0.3 <= time.monotonic() - started < 2


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def boom(deadline_seconds, message):
        raise RuntimeError("GCS said no\nsecond line")

    monkeypatch.setattr(drain_node, "run", boom)
    assert drain_node.main(["--deadline-seconds", "5"]) == 0
    out = capsys.readouterr().out
    assert out == "drain_node: failed (RuntimeError: GCS said no); nothing more done\n"

