"""What a generation job leaves in --output: gzipped JSONL shards (byte-identical on a rerun), a shard found there
checked against the plan before it is reused, manifest.json written last, and the identity that refuses a resume
with another model or other settings."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any

from job.core import guard, storage
from job.core.errors import UserError
from job.generation.plan import SAMPLES_DIR, Plan

MANIFEST = "manifest.json"


def shard_bytes(records: list[dict[str, Any]]) -> bytes:
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
    return gzip.compress(body, mtime=0)  # mtime=0: byte-identical reruns


def parse_shard(blob: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(blob).decode().splitlines()]


def read_shard(url: str) -> list[dict[str, Any]]:
    return parse_shard(storage.read_bytes(url))


def existing_shard(plan: Plan, index: int) -> dict[str, Any] | None:
    """Summary of a complete shard already in --output (resume), None if absent.

    A shard written with other settings is refused rather than silently mixed in."""
    url = plan.shard_url(index)
    if not storage.exists(url):
        return None
    blob = storage.read_bytes(url)
    try:
        records = parse_shard(blob)
    except (OSError, EOFError, ValueError):
        return None  # unreadable (not ours): regenerate over it
    start, end = plan.shards[index]
    params = plan.record_params()
    if [r.get("id") for r in records] != list(range(start, end)) or any(
        {k: r.get(k) for k in params} != params or r.get("prompt") != plan.prompts[r["id"]] for r in records
    ):
        raise UserError(f"{url} holds samples made with other settings; use a new --output or the same flags")
    return summary(plan, index, records, blob)


def summary(plan: Plan, index: int, records: list[dict[str, Any]], blob: bytes) -> dict[str, Any]:
    return {"index": index, "file": f"{SAMPLES_DIR}/part-{index:05d}.jsonl.gz", "first_id": plan.shards[index][0],
            "samples": len(records), "chars": sum(len(r["text"]) for r in records),
            "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


def write_manifest(plan: Plan, shards: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    cfg = plan.cfg
    params = {k: v for k, v in asdict(cfg).items() if k not in ("print_samples", "in_process", "model", "output")}
    params["batch_size"] = cfg.batch  # resolved (0 means "by device" on the command line)
    manifest = {
        "num_samples": sum(s["samples"] for s in shards),
        "total_chars": sum(s["chars"] for s in shards),
        "shards": sorted(shards, key=lambda s: s["index"]),
        "parameters": params,
        "model": {"url": plan.model_url, "sha256": plan.model_config.get("model_sha256"),
                  "config": plan.model_config},
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


# What a generation output is made of: a shard reused on resume must come from the same model and settings.
IDENTITY_SETTINGS = ("length", "temperature", "top_k", "top_p", "seed", "shard_size", "prompt", "prompts",
                     "unknown_chars")


def identity(plan: Plan) -> dict[str, Any]:
    settings = asdict(plan.cfg)
    return {"model": {"url": plan.model_url, "sha256": plan.model_config.get("model_sha256")},
            "settings": {k: settings[k] for k in IDENTITY_SETTINGS}}


def refuse_mixed_samples(plan: Plan) -> dict[str, Any] | None:
    """--output holds the samples of one model with one set of sampling settings: a resume with another model
    (the same URL retrained counts: its sha256 is compared) or other settings is refused in one line."""
    record = guard.require_kind(plan.cfg.output, "generation", "--output")
    if record is None:
        return None
    now = identity(plan)
    then_sha, now_sha = record.get("model", {}).get("sha256"), now["model"]["sha256"]
    if then_sha != now_sha:
        raise UserError(
            f"{plan.cfg.output} holds samples of the model at {record.get('model', {}).get('url')} with sha256 "
            f"{str(then_sha)[:12]}…; the model at {plan.model_url} is {str(now_sha)[:12]}… (retrained or another "
            "model): give its samples another --output")
    diffs = guard.differences(record.get("settings", {}), now["settings"], IDENTITY_SETTINGS)
    if diffs:
        raise UserError(f"{plan.cfg.output} holds samples made with other settings: {'; '.join(diffs)}; resume with "
                        "the same flags, or give these samples another --output")
    return record
