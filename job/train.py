"""`python -m job.train`: the training job. Its flags (load_train_config: preset < a parent's settings < config file
< flags), the driver's checks before any cluster (preflight), then the Ray Train launcher around
job.training.worker.train_func (job.cluster.launch), or that function in this process with --in-process.

Under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a
local Ray instance, so the same command works on a laptop, a Ray cluster and a KubeRay RayJob.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from job.cluster import capacity
from job.cluster.launch import launch_ray
from job.core import guard, report, schema, storage
from job.core.config import DEFAULT_CORPUS_URL, PRESETS, TrainConfig, parse_workers, train_parser
from job.core.errors import UserError, run_cli
from job.data import prepare
from job.model import finetune
from job.training.session import record_run, refuse_mixed_runs
from job.training.worker import ensure_dataset, train_func


def _preset_in(argv: list[str] | None) -> str:
    """The --preset on the command line (for --help's defaults); `default` when none or an unknown one."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    found = pre.parse_known_args(argv)[0].preset
    return found if found in PRESETS else "default"


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        text = storage.read_text(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the user as one line
        raise UserError(f"cannot read config file {path}: {exc}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # measured ~16 ms of `job.train --help`'s ~400 ms: paid only for a YAML --config

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"config file {path} is not valid YAML/JSON ({first}); fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown setting {key!r}; see python -m job.train --help")
        out[name] = value
    return out


def load_train_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and an optional config file) into a validated TrainConfig."""
    args = train_parser(_preset_in(argv)).parse_args(argv)
    flags = schema.given(args, TrainConfig)
    from_file = _read_config_file(args.config) if args.config else {}
    init_from = flags.get("init_from") or from_file.get("init_from")
    parent = inherited = None
    if init_from:
        parent = finetune.find_parent(init_from)
        inherited = finetune.inherited_settings(parent)
    preset = flags.get("preset") or from_file.get("preset") or (inherited or {}).get("preset") or "default"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if inherited and inherited.get("preset", preset) != preset:  # another preset: only its shape is compared
        inherited = {k: inherited[k] for k in ("learning_rate", "lr_patience")}
    # Precedence: preset < the parent's settings (fine-tuning) < config file < flags.
    merged: dict[str, Any] = {"preset": preset, **PRESETS[preset], **(inherited or {}), **from_file, **flags}
    if "num_workers" in merged:
        merged["min_workers"], merged["num_workers"] = parse_workers(merged["num_workers"])
    try:
        cfg = TrainConfig(**merged)
    except TypeError as exc:
        raise UserError(f"invalid settings: {exc}") from None
    schema.coerce(cfg, UserError)
    if cfg.corpus is None:
        cfg.corpus = DEFAULT_CORPUS_URL
    cfg.validate()
    if parent is not None:
        changes = finetune.shape_changes(parent, cfg.to_dict())
        if changes:
            raise UserError(f"--init-from {parent.url} cannot start a model of another shape: {'; '.join(changes)}; "
                            "drop the settings that change it (the parent's are the defaults), or train from scratch")
    return cfg


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Before any training, in this order (main has checked that --output is writable and taken its lease): --output
    must hold this run or nothing (job.training.session.refuse_mixed_runs); the corpus must list and the dataset
    location take files, both before any Ray starts; under Ray, the cluster must be able to fit the workers (or be
    able to grow: job.cluster.capacity); then the prepared dataset must exist for this corpus and these options
    (made here once, streaming the raw files; reused on resubmission and resume, so workers never read raw text) and
    be long enough for one batch and the held-out protocol; then a growing cluster is waited for (bounded); last,
    --output records the run. A refusal before the dataset step leaves --output as it was; a wait that ends without
    the nodes leaves only the prepared dataset, which the next attempt reuses, whatever its worker count."""
    record = refuse_mixed_runs(cfg)
    # Everything that can be checked without a cluster, before one starts: a typo costs a second, not Ray's start.
    prepare.list_sources(cfg.corpus, (cfg.output, cfg.data_url))
    storage.check_writable(cfg.data_url)
    wait = 0.0
    if not cfg.in_process:
        capacity.connect(cfg.num_workers, cfg.cpus_per_worker)
        wait = capacity.check_capacity(cfg.worker_counts[0], cfg.cpus_per_worker, cfg.use_gpu,
                                       cfg.capacity_wait_minutes)
    meta = ensure_dataset(cfg, log=lambda line: print(line, flush=True))
    # After the dataset: preparing a large corpus and an autoscaler bringing nodes up both take minutes.
    capacity.wait_for_capacity(cfg.worker_counts[0], cfg.cpus_per_worker, cfg.use_gpu, wait,
                               log=lambda line: print(line, flush=True))
    if record is None:  # the run will start: only now does --output take its identity (and settings)
        record_run(cfg)
    return meta


def main(argv: list[str] | None = None) -> int:
    cfg = load_train_config(argv)
    report.quiet_tensorflow(cfg.verbose)
    storage.check_writable(cfg.output)
    # One writer per --output for the whole run: the driver holds the lease, so Ray's worker restarts and elastic
    # resizes stay one writer, and a second command into the same --output is refused in one line.
    with guard.Lease(cfg.output, f"training run {cfg.run!r}", log=lambda line: print(line, flush=True)):
        preflight(cfg)
        if cfg.in_process:
            final = train_func({**cfg.to_dict(), "_dataset_ready": True})
        else:
            final = launch_ray(cfg)
    print(json.dumps({"final": final}, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
