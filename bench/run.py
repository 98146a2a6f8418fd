"""Side-by-side benchmark of charlstm against the Keras tutorial's method, on this machine.

    python -m bench.run --corpus PATH [--only train|gen|scale|corpus|s3|finetune|preempt] [--seconds 300]
                        [--out bench/results]

Training: equal wall-clock budgets for the tutorial (`seed-small` preset) and ours (`default` preset),
each through `job.training.worker.train_func` in-process, in its own process; held-out loss of the exported model
with the full protocol (`job.evaluate`). Generation: the tutorial's per-character `model.predict` loop vs
our batched `job.sample.Sampler`. Both are related to the dense fp32 matmul FLOP/s measured in the same run.

Corpus scale (bench/corpus_bench.py): prepare time, cached-run set-up, worker peak RSS and training chars/s
for corpora of 1 MB to 1 GB made from the benchmark text. S3 scale (bench/s3_bench.py): a 1 GB corpus prepared
local -> local and S3 -> S3 (a local S3 server) side by side, and a node's download of the dataset. Node loss
(bench/preempt_bench.py): the steps lost when a node of a run goes, announced (drained) or not, on a multi-node
Ray cluster on this machine.

Writes <out>/<YYYY-MM-DD>.json, <out>/loss_vs_time.png, <out>/gen_chars_per_sec.png and <out>/latest.md
(and <out>/corpus_scale.{json,md,png}, <out>/s3_scale.{json,md}), and prints the Markdown tables. The corpus
is never downloaded: pass --corpus or set CORPUS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common, corpus_bench, scale_bench

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Targets (README / issue): ours vs the tutorial on the same machine.
TARGET_LOSS_NATS = 1.32  # default preset, held-out, after 300 s of training
TARGET_TRAIN_RATIO = 50.0  # predicted chars/s, ours / tutorial
TARGET_GEN_CHARS_PER_SEC = 50_000.0
TARGET_SECONDS = 300.0


class BenchError(Exception):
    """A problem the user can fix; printed as one line."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("CORPUS"),
                   help="Local path (or file:// URL) of the corpus; default: $CORPUS. Never downloaded.")
    p.add_argument("--only", choices=tuple(SECTIONS),
                   help="Run only the training, generation, scaling, corpus-scale, S3-scale, fine-tuning or "
                        "node-loss part.")
    p.add_argument("--corpus2", default=os.environ.get("CORPUS2"),
                   help="Second corpus (local path) for the fine-tuning part; default: $CORPUS2, else invented prose "
                        "the bench writes.")
    p.add_argument("--finetune-seconds", type=float, default=120.0,
                   help="Training budget of each run on the second corpus (default 120; the parent gets --seconds).")
    p.add_argument("--seconds", type=float, default=TARGET_SECONDS,
                   help="Training wall-clock budget per method (default 300; the loss target is for 300 s).")
    p.add_argument("--out", default=str(HERE / "results"), help="Results folder (default bench/results).")
    p.add_argument("--workdir", default=str(HERE / "work"),
                   help="Scratch folder for the training runs (default bench/work, gitignored; wiped per run).")
    p.add_argument("--no-train-job", dest="train_job", action="store_false",
                   help="Skip the training run through the CLI under local Ray (python -m job.train).")
    p.add_argument("--gen-batches", type=_int_list, default=[1, 64, 256, 512, 2048],
                   help="Sampler batch sizes (default 1,64,256,512,2048).")
    p.add_argument("--gen-job-samples", type=int, default=10_000,
                   help="Samples of each timed generation-job run (the CLI, default flags; default 10000; 0: skip).")
    p.add_argument("--gen-length", type=int, default=500, help="Characters generated per sample (default 500).")
    p.add_argument("--gen-repeats", type=int, default=3, help="Timed calls per batch size, median (default 3).")
    p.add_argument("--gen-units", type=_int_list, default=None,
                   help="LSTM sizes of the generation model (default: the shipped default preset's).")
    p.add_argument("--gen-temperature", type=float, default=1.0,
                   help="Sampling temperature for our sampler (default 1.0; 0 = greedy).")
    p.add_argument("--tutorial-chars", type=int, default=100,
                   help="Characters generated with the tutorial's predict loop (default 100).")
    p.add_argument("--matmul-n", type=int, default=2048, help="Size of the reference matmul (default 2048).")
    p.add_argument("--scale-workers", type=_int_list, default=[1, 2],
                   help="Ray worker counts for the scaling run, 1 CPU each (default 1,2).")
    p.add_argument("--corpus-sizes", type=_int_list, default=list(corpus_bench.SIZES_MB),
                   help="Corpus sizes in MB for the corpus-scale part (default 1,10,100,1000).")
    p.add_argument("--corpus-minutes", type=float, default=1.0,
                   help="Training budget of each cached run in the corpus-scale part (default 1).")
    p.add_argument("--s3-size-mb", type=int, default=1000,
                   help="Corpus size in MB for the S3-scale part (local -> local beside S3 -> S3; default 1000).")
    p.add_argument("--scale-epochs", type=int, default=6,
                   help="Epochs per scaling run; the first (compilation) is not counted (default 6).")
    return p


def check_corpus(corpus: str | None) -> str:
    if not corpus:
        raise BenchError("no corpus: pass --corpus PATH or set CORPUS to a local text file (the benchmark "
                         "never downloads)")
    if corpus.split("://", 1)[0].lower() in ("http", "https") and "://" in corpus:
        raise BenchError(f"--corpus {corpus} is a web URL; the benchmark never downloads: save it locally first")
    path = corpus[len("file://"):] if corpus.startswith("file://") else corpus
    if "://" in path:
        raise BenchError(f"--corpus {corpus}: give a local path or a file:// URL")
    if not os.path.isfile(path):
        raise BenchError(f"corpus {path} does not exist or is not a file; pass --corpus PATH or set CORPUS")
    from job.core.errors import UserError
    from job.data import corpus as corpus_lib

    try:
        corpus_lib.load(os.path.abspath(path))
    except UserError as exc:
        raise BenchError(str(exc)) from None
    return os.path.abspath(path)


# ------------------------------------------------------------------------------------------ phases


def run_training(preset: str, corpus: str, seconds: float, workdir: Path) -> dict[str, Any]:
    out_dir = workdir / preset
    summary = workdir / f"{preset}.json"
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.train_bench", "--preset", preset, "--corpus", corpus,
           "--seconds", str(seconds), "--workdir", str(out_dir), "--json", str(summary)]
    print(f"\n== training {preset} for {seconds:g} s (in-process train_func, scratch {out_dir})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not summary.exists():
        return {"preset": preset, "error": f"bench.train_bench exited with {proc.returncode}",
                "wall_sec": time.perf_counter() - t0}
    result = json.loads(summary.read_text())
    result["process_wall_sec"] = time.perf_counter() - t0
    return result


def run_generation(args, vocab_size: int, corpus: str, workdir: Path) -> dict[str, Any]:
    from bench import gen_bench, gen_job
    from job.generation.settings import CPU_BATCH

    print(f"\n== generation: tutorial loop ({args.tutorial_chars} chars)", flush=True)
    tut = gen_bench.tutorial_loop(vocab_size, args.tutorial_chars)
    print(f"   tutorial loop: {tut['chars_per_sec']:.1f} chars/s", flush=True)
    print(f"== generation: Sampler, batches {args.gen_batches}, {args.gen_length} chars each", flush=True)
    ours = gen_bench.sampler_rates(vocab_size, args.gen_units, args.gen_batches, args.gen_length,
                                   args.gen_repeats, args.gen_temperature)
    for row in ours["rows"]:
        print(f"   batch {row['batch']:>5}: {row['chars_per_sec']:,.0f} chars/s", flush=True)
    plain = gen_bench.sampler_rates(vocab_size, args.gen_units, [CPU_BATCH], args.gen_length,
                                    args.gen_repeats, args.gen_temperature, xla=False)
    print(f"   batch {CPU_BATCH:>5}, plain graph (--no-xla): {plain['rows'][0]['chars_per_sec']:,.0f} chars/s",
          flush=True)
    result = {"tutorial": tut, "ours": ours, "plain": plain}
    if args.gen_job_samples:
        result["job"] = gen_job.run(corpus, workdir, args.gen_job_samples, args.gen_length)
    return result


# Assumptions of the on-paper sizing estimate (README "Scaling"): a mid-range cloud GPU such as an A10G
# (31 TFLOP/s fp32 peak) sustaining a third of it on cuDNN LSTMs, and a 25 Gb/s node network.
SIZING_HARDWARE = scale_bench.Hardware(name="GPU sustaining 10 TFLOP/s fp32, 25 Gb/s network",
                                       tflops_fp32=10.0, link_gbps=25.0)
SIZING_WORKERS = [1, 2, 4, 8, 16]
# A GPU-sized configuration to set beside the 2-core default (a --config file on a cluster).
GPU_EXAMPLE = {"units": [1024, 1024], "embed_dim": 128, "batch_size": 256, "seq_len": 100}


def run_scaling(args, corpus: str, workdir: Path, vocab_size: int) -> dict[str, Any]:
    from job.core.config import PRESETS, TrainConfig

    measured = scale_bench.measure(corpus, workdir, args.scale_workers, args.scale_epochs)
    default = TrainConfig(**{**PRESETS["default"], "output": "x"})
    gpu = TrainConfig(**{**PRESETS["default"], **GPU_EXAMPLE, "output": "x"})
    return {
        "measured": measured,
        "sizing": {
            "default": scale_bench.sizing(default, vocab_size, SIZING_WORKERS, SIZING_HARDWARE),
            "gpu_example": {"config": GPU_EXAMPLE,
                            **scale_bench.sizing(gpu, vocab_size, SIZING_WORKERS, SIZING_HARDWARE)},
        },
    }


# ------------------------------------------------------------------------------------------ report


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**NO**")


def assess(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and target verdicts from the raw figures."""
    peak = results["matmul"]["flops_per_sec"]
    out: dict[str, Any] = {}
    tr = results.get("training")
    if tr:
        tut, ours = tr["tutorial"], tr["ours"]
        ok = "error" not in tut and "error" not in ours
        for r in (tut, ours):
            if "error" not in r:
                r["train_flops_fraction_of_matmul"] = r["train_flops_per_sec_steps"] / peak
        out["train_ratio_chars_per_sec"] = (
            _ratio(ours["chars_per_sec_steps"], tut["chars_per_sec_steps"]) if ok else None)
        out["train_ratio_loss"] = _ratio(ours["heldout_loss_nats"], tut["heldout_loss_nats"]) if ok else None
        loss = ours.get("heldout_loss_nats")
        out["target_loss"] = {
            "target": f"default held-out loss <= {TARGET_LOSS_NATS} nats/char after {TARGET_SECONDS:g} s",
            "measured": loss, "seconds": tr["seconds"],
            "met": None if loss is None else bool(loss <= TARGET_LOSS_NATS),
            "valid_budget": tr["seconds"] >= TARGET_SECONDS,
        }
        ratio = out["train_ratio_chars_per_sec"]
        out["target_train_speed"] = {
            "target": f"training predicted chars/s >= {TARGET_TRAIN_RATIO:g}x the tutorial's",
            "measured": ratio, "met": None if ratio is None else bool(ratio >= TARGET_TRAIN_RATIO),
        }
    gen = results.get("generation")
    if gen:
        tut_rate = gen["tutorial"]["chars_per_sec"]
        gen["tutorial"]["flops_fraction_of_matmul"] = gen["tutorial"]["flops_per_sec"] / peak
        for row in gen["ours"]["rows"]:
            row["ratio_vs_tutorial"] = row["chars_per_sec"] / tut_rate
            row["flops_fraction_of_matmul"] = row["flops_per_sec"] / peak
        best = max(gen["ours"]["rows"], key=lambda r: r["chars_per_sec"])
        out["target_gen_speed"] = {
            "target": f"generation >= {TARGET_GEN_CHARS_PER_SEC:,.0f} chars/s",
            "measured": best["chars_per_sec"], "at_batch": best["batch"],
            "met": bool(best["chars_per_sec"] >= TARGET_GEN_CHARS_PER_SEC),
        }
        if "job" in gen:
            from bench import gen_job

            out["target_gen_job"] = gen_job.targets(gen["job"])
    if results.get("finetune"):
        from bench import finetune_bench

        found = finetune_bench.target(results["finetune"])
        if found:
            out["target_finetune"] = found
    return out


def markdown(results: dict[str, Any]) -> str:
    """The run's Markdown report: machine, each part that ran, then the targets."""
    lines = _header_markdown(results)
    if results.get("training"):
        lines += _training_markdown(results["training"])
    if results.get("generation"):
        lines += _generation_markdown(results["generation"])
    if results.get("finetune"):
        from bench import finetune_bench

        lines += finetune_bench.markdown(results["finetune"])
    if results.get("s3_scale"):
        from bench import s3_bench

        lines += ["## Corpora from S3", "", s3_bench.markdown(results["s3_scale"]), ""]
    if results.get("node_loss"):
        from bench import preempt_bench

        lines += ["## Node loss: announced vs unannounced", "", preempt_bench.markdown(results["node_loss"]), ""]
    lines += _targets_markdown(results["assessment"])
    if "scaling" in results:
        lines += scaling_markdown(results["scaling"])
    return "\n".join(lines)


def _header_markdown(results: dict[str, Any]) -> list[str]:
    m, peak = results["machine"], results["matmul"]["flops_per_sec"]
    return [
        f"# charlstm benchmark, {m['date']}",
        "",
        f"Machine: {m['platform']}, {m['cpus_usable'] or m['cpu_count']} usable CPU(s) "
        f"(load avg at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'] or [])}); "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, Ray {m['ray']}.",
        f"Reference: dense fp32 {results['matmul']['n']}x{results['matmul']['n']} `tf.matmul` = "
        f"**{peak / 1e9:,.1f} GFLOP/s** (median of {len(results['matmul']['samples_sec'])}).",
        "",
    ]


def _training_markdown(tr: dict[str, Any]) -> list[str]:
    tut, ours = tr["tutorial"], tr["ours"]
    lines = [f"## Training, equal wall clock ({tr['seconds']:g} s each, in-process `train_func`)", ""]
    if "error" in tut or "error" in ours:
        lines += [f"- tutorial: {tut.get('error', 'ok')}; ours: {ours.get('error', 'ok')}", ""]
    else:
        def row(label, key, digits=3, ratio=True, fmt=None):
            f = fmt or (lambda r: _fmt(r.get(key), digits))
            rr = _fmt(_ratio(ours.get(key), tut.get(key)), 2) + "x" if ratio else ""
            return f"| {label} | {f(tut)} | {f(ours)} | {rr} |"

        def flops(r):
            return f"{r['train_flops_per_sec_steps'] / 1e9:,.1f} ({100 * r['train_flops_fraction_of_matmul']:.0f}%)"

        def epochs(r):
            partial = ", last partial" if r["last_epoch_partial"] else ""
            return f"{r['epochs_seen']:.3f} ({r['epochs_recorded']} point(s){partial})"

        lines += [
            "| | tutorial (`seed-small`) | ours (`default`) | ours / tutorial |",
            "|---|---:|---:|---:|",
            row("held-out loss, nats/char (exported model, full held-out protocol)", "heldout_loss_nats", 4),
            row("held-out bits/char", "heldout_bits_per_char", 4),
            row("predicted chars/s, training steps (`chars_per_sec`)", "chars_per_sec_steps", 0),
            row("predicted chars/s, overall (incl. compile, per-epoch eval/sample/export)",
                "chars_per_sec_overall", 0),
            row("predicted chars seen", "train_chars", 0),
            row("epochs seen (held-out points)", "epochs_seen", ratio=False, fmt=epochs),
            row("exported model from epoch", "exported_epoch", ratio=False, fmt=lambda r: str(r["exported_epoch"])),
            row("train GFLOP/s, approx. 3x forward (% of matmul)", "train_flops_per_sec_steps", ratio=True,
                fmt=flops),
            "",
            f"Per-epoch held-out points: tutorial = {tut['per_epoch_val_protocol']}; "
            f"ours = {ours['per_epoch_val_protocol']}. Training FLOPs per predicted char: tutorial "
            f"{tut['flops_train_per_predicted_char'] / 1e6:.1f} M (a whole 100-step window per char), ours "
            f"{ours['flops_train_per_predicted_char'] / 1e6:.1f} M.",
            "",
        ]
    if "job" in tr:
        from bench import train_job

        lines += ["### The same, as users run it: the training CLI under local Ray", ""]
        lines += train_job.markdown(tr["job"], ours)
    return lines


def _generation_markdown(gen: dict[str, Any]) -> list[str]:
    tut, ours = gen["tutorial"], gen["ours"]
    lines = [
        f"## Generation ({ours['model']}, untrained weights, temperature {ours['temperature']:g})", "",
        "| method | batch | chars | chars/s | x tutorial | GFLOP/s | % of matmul |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| tutorial `model.predict` loop | 1 | {tut['chars']} | {tut['chars_per_sec']:,.1f} | 1.00x | "
        f"{tut['flops_per_sec'] / 1e9:,.2f} | {100 * tut['flops_fraction_of_matmul']:.1f}% |",
    ]
    for r in ours["rows"]:
        lines.append(
            f"| ours, `Sampler` | {r['batch']} | {r['batch'] * r['length']:,} | {r['chars_per_sec']:,.0f} | "
            f"{r['ratio_vs_tutorial']:,.0f}x | {r['flops_per_sec'] / 1e9:,.2f} | "
            f"{100 * r['flops_fraction_of_matmul']:.1f}% |")
    lines += [
        "",
        f"FLOPs per generated char: ours {ours['flops_per_generated_char'] / 1e6:.2f} M "
        "(sum over layers of 2*4*u*(in+u), plus 2*u*V for the head; priming steps counted without the head); "
        f"tutorial {tut['flops_per_char'] / 1e6:.2f} M (100 steps of 2*4*256*(1+256), plus 2*256*V). "
        f"chars/s = batch x length / median seconds of {len(ours['rows'][0]['seconds'])} calls after a warm-up.",
        "",
    ]
    from job.core.config import PRESETS

    shipped = PRESETS["default"]["units"]
    if list(ours["units"]) != list(shipped):
        lines += [f"Note: the shipped `default` preset has LSTM {'x'.join(map(str, shipped))}; this run measured "
                  f"{'x'.join(map(str, ours['units']))} (`--gen-units`).", ""]
    if "job" in gen:
        from bench import gen_job
        from job.generation.settings import CPU_BATCH

        kernel = [r for r in ours["rows"] if r["batch"] == CPU_BATCH] + gen.get("plain", {}).get("rows", [])
        lines += gen_job.markdown(gen["job"], kernel)
    return lines


def _targets_markdown(a: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | met? |", "|---|---:|:---:|"]
    if "target_loss" in a:
        t = a["target_loss"]
        note = "" if t["valid_budget"] else f" (only {t['seconds']:g} s here: not a valid test)"
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 4)} nats after {t['seconds']:g} s{note} | "
                     f"{_yes(t['met'] if t['valid_budget'] else None)} |")
        t = a["target_train_speed"]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 1)}x | {_yes(t['met'])} |")
    if "target_gen_speed" in a:
        t = a["target_gen_speed"]
        lines.append(f"| {t['target']} | {t['measured']:,.0f} chars/s (batch {t['at_batch']}) | {_yes(t['met'])} |")
    for t in a.get("target_gen_job", []):
        lines.append(f"| {t['target']} | {t['measured']:,.0f} chars/s | {_yes(t['met'])} |")
    if "target_finetune" in a:
        t = a["target_finetune"]
        lines.append(f"| {t['target']} | {t['measured']:.4f} nats | {_yes(t['met'])} |")
    return lines


def scaling_markdown(sc: dict[str, Any]) -> list[str]:
    m = sc["measured"]
    lines = ["", f"## Scaling: {m['preset']} preset, Ray workers with {m['cpus_per_worker']} CPU each, this machine",
             "", "| Ray workers | global batch | chars/s (median epoch) | speedup | efficiency |",
             "|---:|---:|---:|---:|---:|"]
    for r in m["rows"]:
        if "error" in r:
            lines.append(f"| {r['workers']} | | error: {r['error']} | | |")
            continue
        lines.append(f"| {r['workers']} | {r['global_batch']} | {_fmt(r['chars_per_sec'], 0)} | "
                     f"{_fmt(r.get('speedup'), 2)}x | {_fmt(100 * r.get('efficiency', math.nan), 0)}% |")
    lines += ["", f"Median of the per-epoch rates after the first of {m['epochs']} epochs (the first includes "
              "compilation). Both workers share this machine's 2 cores, and the all-reduce runs over loopback "
              "gRPC: this shows the job scales, not what a cluster gains.", ""]
    for key, title in (("default", "`default` preset (2-core sizes)"), ("gpu_example", "GPU-sized config")):
        z = sc["sizing"][key]
        hw = z["hardware"]
        extra = f" ({', '.join(f'{k} {v}' for k, v in z['config'].items())})" if "config" in z else ""
        lines += [
            f"### On paper: {title}{extra}", "",
            f"{z['params']:,} parameters = {z['gradient_mb']:.2f} MB of fp32 gradient all-reduced per step; "
            f"{z['chars_per_worker_step']:,} predicted chars and {z['gflop_per_worker_step']:.2f} GFLOP "
            f"(3x forward) per worker per step. Assumed: {hw['name']}, at least {hw['launch_us']:g} µs per "
            f"layer, time step and pass. Compute per step: {z['flops_ms']:.2f} ms of FLOPs, "
            f"{z['latency_ms']:.2f} ms of sequential launches"
            f"{' (latency-bound: a GPU is mostly idle at this size)' if z['latency_bound'] else ''}.", "",
            "| GPU workers | global batch | all-reduce MB sent per worker | compute ms | all-reduce ms | "
            "chars/s | scaling efficiency |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in z["rows"]:
            lines.append(f"| {r['workers']} | {r['global_batch']} | {r['allreduce_mb_per_worker']:.2f} | "
                         f"{r['compute_ms']:.2f} | {r['comm_ms']:.2f} | {r['chars_per_sec']:,.0f} | "
                         f"{100 * r['efficiency']:.0f}% |")
        lines.append("")
    return lines


def plot_loss(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = results["training"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    right = 1.0
    for key, label, color in (("tutorial", "tutorial (seed-small)", "tab:red"), ("ours", "ours (default)", "tab:blue")):
        r = tr[key]
        if "error" in r:
            continue
        xs = [p["elapsed_sec"] for p in r["curve"]]
        ys = [p["val_loss"] for p in r["curve"]]
        right = max(right, *xs)
        ax.plot(xs, ys, marker="o", color=color, label=f"{label}: per-epoch held-out")
        ax.scatter([xs[-1]], [r["heldout_loss_nats"]], marker="*", s=160, color=color, zorder=5,
                   label=f"{label}: final, full protocol ({r['heldout_loss_nats']:.3f})")
    ax.axhline(TARGET_LOSS_NATS, ls="--", color="gray", label=f"target {TARGET_LOSS_NATS} nats (default, 300 s)")
    ax.axhline(math.log(results["corpus"]["vocab_size"]), ls=":", color="black",
               label=f"uniform guess, ln {results['corpus']['vocab_size']}")
    ax.set_xlim(0, right * 1.05)
    ax.set_xlabel("training wall-clock seconds")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.set_title(f"held-out loss vs time, {tr['seconds']:g} s budget each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gen(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = results["generation"]
    rows = gen["ours"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot([r["batch"] for r in rows], [r["chars_per_sec"] for r in rows], marker="o", color="tab:blue",
            label=f"ours: Sampler ({gen['ours']['model']})")
    ax.axhline(gen["tutorial"]["chars_per_sec"], color="tab:red",
               label=f"tutorial predict loop ({gen['tutorial']['chars_per_sec']:.1f} chars/s)")
    ax.axhline(TARGET_GEN_CHARS_PER_SEC, ls="--", color="gray", label="target 50,000 chars/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (samples generated together)")
    ax.set_ylabel("generated chars/s")
    ax.set_title("generation speed")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def _training(args, corpus: str, text: str, vocab_size: int, workdir: Path, out: Path) -> dict[str, Any]:
    from bench import tutorial

    check = tutorial.check_seed_small(vocab_size)
    if not check["matches"]:
        print(f"WARNING: seed-small differs from the tutorial: {check['differences']}", flush=True)
    found = {"seconds": args.seconds, "tutorial_check": check,
             "tutorial": run_training("seed-small", corpus, args.seconds, workdir),
             "ours": run_training("default", corpus, args.seconds, workdir)}
    if args.train_job:
        from bench import train_job

        found["job"] = train_job.run(corpus, workdir, args.seconds)
    return found


def _finetune(args, corpus: str, text: str, vocab_size: int, workdir: Path, out: Path) -> dict[str, Any]:
    from bench import finetune_bench

    corpus2 = check_corpus(args.corpus2) if args.corpus2 else None
    found = finetune_bench.run(corpus, corpus2, workdir, args.seconds, args.finetune_seconds)
    finetune_bench.plot(found, out / f"finetune{'-finetune' if args.only else ''}.png")
    return found


def _corpus_scale(args, corpus: str, text: str, vocab_size: int, workdir: Path, out: Path) -> dict[str, Any]:
    found = corpus_bench.run(text, workdir / "corpus-scale", args.corpus_sizes, args.corpus_minutes)
    (out / "corpus_scale.json").write_text(json.dumps(found, indent=2, sort_keys=True))
    (out / "corpus_scale.md").write_text(corpus_bench.markdown(found) + "\n")
    corpus_bench.plot(found, out / "corpus_scale.png")
    print("\n" + corpus_bench.markdown(found), flush=True)
    return found


def _s3_scale(args, corpus: str, text: str, vocab_size: int, workdir: Path, out: Path) -> dict[str, Any]:
    from bench import s3_bench

    found = s3_bench.run(text, workdir / "s3-scale", args.s3_size_mb)
    (out / "s3_scale.json").write_text(json.dumps(found, indent=2, sort_keys=True))
    (out / "s3_scale.md").write_text(s3_bench.markdown(found) + "\n")
    print("\n" + s3_bench.markdown(found), flush=True)
    return found


def _node_loss(args, corpus: str, text: str, vocab_size: int, workdir: Path, out: Path) -> dict[str, Any]:
    from bench import preempt_bench

    return preempt_bench.run(text, workdir / "node-loss")


# --only name -> (results key, runner), in the order a full run takes them.
SECTIONS = {
    "train": ("training", _training),
    "gen": ("generation", lambda args, corpus, text, vocab_size, workdir, out:
            run_generation(args, vocab_size, corpus, workdir)),
    "finetune": ("finetune", _finetune),
    "scale": ("scaling", lambda args, corpus, text, vocab_size, workdir, out:
              run_scaling(args, corpus, workdir, vocab_size)),
    "corpus": ("corpus_scale", _corpus_scale),
    "s3": ("s3_scale", _s3_scale),
    "preempt": ("node_loss", _node_loss),
}


def _write(results: dict[str, Any], only: str | None, out: Path) -> None:
    # A partial run (--only) writes its own file and leaves the full run's JSON and latest.md as they are.
    stamp = results["machine"]["date"] + (f"-{only}" if only else "")
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    suffix = f"-{only}" if only else ""  # a partial run keeps the full run's plots too
    if "training" in results and any("error" not in results["training"][k] for k in ("tutorial", "ours")):
        plot_loss(results, out / f"loss_vs_time{suffix}.png")
    if "generation" in results:
        plot_gen(results, out / f"gen_chars_per_sec{suffix}.png")
    table = markdown(results)
    if not only:
        (out / "latest.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    print(f"\nwrote {out / f'{stamp}.json'}{'' if only else ', ' + str(out / 'latest.md')} and plots in {out}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.gen_units is None:
        from job.core.config import PRESETS

        args.gen_units = list(PRESETS["default"]["units"])
    corpus = check_corpus(args.corpus)
    if args.seconds <= 0 or args.gen_length < 1 or args.gen_repeats < 1 or args.tutorial_chars < 1:
        raise BenchError("--seconds, --gen-length, --gen-repeats and --tutorial-chars must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    from job.data import corpus as corpus_lib

    text = corpus_lib.load(corpus).text
    vocab_size = len(corpus_lib.Vocab.from_text(text))
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")} | {"corpus": corpus},
        "corpus": {"path": corpus, "chars": len(text), "vocab_size": vocab_size, "sha256": corpus_lib.sha256(text)},
    }
    print(f"== matmul reference ({args.matmul_n}x{args.matmul_n} fp32)", flush=True)
    samples = common.matmul_samples(args.matmul_n)
    for name, (key, section) in SECTIONS.items():
        if args.only in (None, name):
            results[key] = section(args, corpus, text, vocab_size, workdir, out)
    samples += common.matmul_samples(args.matmul_n)  # again at the end: the machine is shared
    flops = common.matmul_flops(args.matmul_n, common.median(samples))
    results["matmul"] = {"n": args.matmul_n, "samples_sec": samples, "flops_per_sec": flops}
    results["assessment"] = assess(results)
    _write(results, args.only, out)
    failed = [k for k in ("tutorial", "ours") if "error" in results.get("training", {}).get(k, {})]
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
