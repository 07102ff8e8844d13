"""The source documents' experiments as sweeps: `python train.py sweep --experiment eyeglasses|grayscale|affact ...`.

A sweep is a list of `train.py fit` command lines, one per run: seed 002's bias series (P = 50, 60, ..., 100 of a
gender model trained with a controlled eyeglasses or grayscale bias) or seed 004's balanced / unbalanced AFFACT
pair. They run here one after another (a fresh process per run) or go to a jobs file, one command per line, for
parallel jobs elsewhere (e.g. a SLURM array: `sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt | bash`).

All runs of one sweep share the W&B group `<sweep id>` and are named `<experiment>_P<P>` or `affact_<variant>`.
Each run's outputs go under `sweeps/<sweep id>/<name>/runs/<W&B run id>/`; `sweeps/<sweep id>/runs.json`
lists them, and `python analyze.py report --runs sweeps/<sweep id> --out DIR` compares them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent
BIAS_P = (50, 60, 70, 80, 90, 100)
EXPERIMENTS = ("eyeglasses", "grayscale", "affact")
DATA = ("synthfaces", "celeba")


@dataclass
class RunSpec:
    """One run of a sweep: its name, the bias rate or variant, the output root and the full command line."""

    name: str
    experiment: str
    root: str
    command: list[str]
    p: int | None = None
    variant: str | None = None
    status: str = "planned"
    run_dir: str | None = None
    returncode: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    extra: dict = field(default_factory=dict)


def base_configs(experiment: str, data: str) -> list[tuple[str, str]]:
    """(variant, config path) pairs: one bias config for seed 002, the balanced/unbalanced pair for seed 004."""
    if experiment in ("eyeglasses", "grayscale"):
        return [("", f"configs/bias_{experiment}.yaml")]
    if experiment == "affact":
        prefix = "affact_synth" if data == "synthfaces" else "affact"
        return [(v, f"configs/{prefix}_{v}.yaml") for v in ("balanced", "unbalanced")]
    raise ValueError(f"--experiment: {experiment!r} is not one of {', '.join(EXPERIMENTS)}")


def data_overrides(experiment: str, data: str, root: str | None) -> list[str]:
    """Command-line options that point the experiment's config at CelebA (SynthFaces is every config's default)."""
    if data == "synthfaces":
        if root is not None:
            raise ValueError("--root is for --data celeba; SynthFaces is rendered and needs no folder")
        return []
    if data != "celeba":
        raise ValueError(f"--data: {data!r} is not one of {', '.join(DATA)}")
    if not root:
        raise ValueError("--data celeba needs --root DIR (the CelebA folder, either layout)")
    if experiment == "affact":
        return ["--data.init_args.root", root]
    return ["--data.init_args.source", "celeba", "--data.init_args.root", root]


def _display_path(path: Path) -> str:
    """Relative to the working directory when inside it (portable jobs files), else absolute."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:
        return str(path)


def plan(experiment: str, sweep_id: str, data: str = "synthfaces", root: str | None = None,
         ps: list[int] | None = None, overlays: list[str] | None = None, extra: list[str] | None = None,
         out: str | Path = "sweeps", python: str | None = None) -> list[RunSpec]:
    """The command lines of a sweep (nothing runs). Overlays are extra `--config` files applied after the
    experiment's own config; `extra` are LightningCLI overrides appended last (they win)."""
    if not sweep_id or any(c in sweep_id for c in "/\\ :"):
        raise ValueError(f"--sweep-id {sweep_id!r}: use letters, digits, '-' and '_' only")
    ps = list(BIAS_P if ps is None else ps)
    if experiment == "affact" and ps != list(BIAS_P):
        raise ValueError("--p is for the bias experiments (eyeglasses, grayscale), not affact")
    for p in ps:
        if not 50 <= p <= 100:
            raise ValueError(f"--p: {p} is outside 50..100 (percentage of male images with the concept)")
    if len(set(ps)) != len(ps):
        raise ValueError(f"--p: repeated values in {ps}")
    for path in overlays or []:
        if not Path(path).is_file():
            raise ValueError(f"--config-overlay: {path} does not exist")
    python = python or sys.executable
    train = _display_path(REPO / "train.py")
    sweep_dir = Path(out) / sweep_id
    runs = []
    for variant, config in base_configs(experiment, data):
        config = _display_path(REPO / config)
        prefix = [python, train, "fit", "--config", config]
        for path in overlays or []:
            prefix += ["--config", path]
        prefix += data_overrides(experiment, data, root)
        items = [(f"{experiment}_P{p}", p) for p in ps] if experiment != "affact" else [(f"affact_{variant}", None)]
        for name, p in items:
            run_root = sweep_dir / name
            cmd = list(prefix)
            if p is not None:
                cmd += ["--data.init_args.p", str(p)]
            cmd += ["--trainer.default_root_dir", str(run_root),
                    "--trainer.logger.init_args.group", sweep_id,
                    "--trainer.logger.init_args.name", name,
                    *(extra or [])]
            runs.append(RunSpec(name=name, experiment=experiment, root=str(run_root), command=cmd, p=p,
                                variant=variant or None))
    return runs


def find_run_dir(root: str | Path) -> Path | None:
    """The run folder (`<root>/runs/<id>/` holding summary.json) of a finished run; the newest if several."""
    found = sorted(Path(root).glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def write_manifest(sweep_dir: Path, experiment: str, sweep_id: str, data: str, runs: list[RunSpec]) -> Path:
    """`runs.json`: the sweep's settings and every run (command, root, status, run folder), written atomically."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "runs.json"
    payload = {"sweep_id": sweep_id, "experiment": experiment, "data": data, "wandb_group": sweep_id,
               "runs": [asdict(r) for r in runs]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def read_manifest(sweep_dir: str | Path) -> dict:
    """A sweep's runs.json with each run's folder resolved (runs finished elsewhere are found under their root)."""
    path = Path(sweep_dir) / "runs.json"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable sweep manifest ({err})") from None
    for run in payload.get("runs", []):
        if not run.get("run_dir"):
            found = find_run_dir(run["root"])
            run["run_dir"] = str(found) if found else None
    return payload


def probe_random_init(run_dir: Path, python: str) -> list[str] | None:
    """`analyze.py probe --compare-random` on the run's last checkpoint with its ProbingCallback's settings
    (trained vs random-init curves for the report), or None when the run has no probing callback."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    probing = next((c for c in callbacks if str(c.get("class_path", "")).endswith("ProbingCallback")), None)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if probing is None or not ckpt.is_file():
        return None
    a = probing.get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    source = ["--data", "celeba", "--root", str(data["root"])] if data.get("source") == "celeba" or (
        data.get("root") and "source" not in data) else ["--data", "synthfaces"]
    size = data.get("image_size") or data.get("size")
    cmd = [python, _display_path(REPO / "analyze.py"), "probe", "--checkpoint", str(ckpt), "--compare-random",
           *source, *(["--size", str(size)] if size else []),
           "--out", str(run_dir / "analysis" / "probing_random_init"), "--split", a.get("split", "val"),
           "--num-images", str(a.get("num_images", 1024)), "--n-train", str(a.get("n_train", 256)),
           "--n-val", str(a.get("n_val", 256)), "--seed", str(a.get("seed", 0))]
    layers = a.get("layers")
    if isinstance(layers, str):
        cmd += ["--layers", layers]
    elif layers:
        cmd += ["--layers", *layers]
    if a.get("attributes"):
        cmd += ["--attributes", *a["attributes"]]
    return cmd


def run_sweep(runs: list[RunSpec], sweep_dir: Path, experiment: str, sweep_id: str, data: str,
              random_init_probes: bool = False, python: str | None = None) -> int:
    """Run each command in a fresh process, one after another; runs.json is rewritten after every run.
    A failed run is recorded and the sweep goes on; the exit status is the number of failed runs (capped)."""
    failed = 0
    for i, run in enumerate(runs):
        print(f"\n[sweep {sweep_id}] run {i + 1}/{len(runs)}: {run.name}\n  {shlex.join(run.command)}", flush=True)
        run.status = "running"
        write_manifest(sweep_dir, experiment, sweep_id, data, runs)
        started, cpu0 = time.perf_counter(), _children_cpu()
        code = subprocess.call(run.command)
        run.returncode, run.seconds = code, round(time.perf_counter() - started, 1)
        found = find_run_dir(run.root)
        run.run_dir = str(found) if found else None
        run.status = "done" if code == 0 and found else "failed"
        if run.status == "done" and random_init_probes:
            cmd = probe_random_init(found, python or sys.executable)
            if cmd is not None:
                print(f"  random-init probes: {shlex.join(cmd)}", flush=True)
                run.extra["random_init_probes"] = subprocess.call(cmd)
        run.cpu_seconds = round(_children_cpu() - cpu0, 1)
        failed += run.status == "failed"
        write_manifest(sweep_dir, experiment, sweep_id, data, runs)
    return min(failed, 100)


def _children_cpu() -> float:
    """CPU seconds (user + system) used so far by finished child processes (estimates unloaded wall time)."""
    t = os.times()
    return t.children_user + t.children_system


def print_locations(runs: list[RunSpec], manifest: Path) -> None:
    """Where the checkpoints, W&B runs and run folders of a finished sweep are."""
    print(f"\nSweep manifest: {manifest}")
    for run in runs:
        line = f"  {run.name}: {run.status}"
        if run.run_dir:
            summary = Path(run.run_dir) / "summary.json"
            info = json.loads(summary.read_text()) if summary.is_file() else {}
            line += (f"\n    run folder  {run.run_dir}\n    checkpoint  "
                     f"{info.get('best_checkpoint') or info.get('last_checkpoint')}\n    W&B run     {info.get('wandb_run')}")
        if run.seconds is not None:
            line += f"\n    {run.seconds:.0f} s wall, {run.cpu_seconds or 0:.0f} s CPU"
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="LightningCLI overrides for every run go after `--`, e.g. "
                                            "-- --trainer.max_epochs 2")
    parser.add_argument("--experiment", required=True, choices=EXPERIMENTS)
    parser.add_argument("--data", default="synthfaces", choices=DATA)
    parser.add_argument("--root", help="CelebA folder (with --data celeba)")
    parser.add_argument("--p", type=int, nargs="+", help=f"bias rates (default {' '.join(map(str, BIAS_P))})")
    parser.add_argument("--config-overlay", action="append", default=[], metavar="YAML",
                        help="extra --config applied after the experiment's config (repeatable; lists such as "
                             "trainer.callbacks are replaced, not merged)")
    parser.add_argument("--sweep-id", help="default: <experiment>-<date>-<time>")
    parser.add_argument("--out", default="sweeps", help="folder of sweep folders")
    parser.add_argument("--dry-run", action="store_true", help="print the command lines, run and write nothing")
    parser.add_argument("--jobs-file", help="write one command line per run to this file instead of running")
    parser.add_argument("--random-init-probes", action="store_true",
                        help="after each run with a ProbingCallback, also probe the random-init network "
                             "(analyze.py probe --compare-random) for the report's trained vs random curves")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.jobs_file:
        parser.error("--dry-run and --jobs-file exclude each other")
    sweep_id = args.sweep_id or f"{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        runs = plan(args.experiment, sweep_id, args.data, args.root, args.p, args.config_overlay, extra, args.out)
    except ValueError as err:
        parser.error(str(err))
    sweep_dir = Path(args.out) / sweep_id
    if args.dry_run:
        print(f"# sweep {sweep_id}: {len(runs)} runs, W&B group {sweep_id}")
        for run in runs:
            print(shlex.join(run.command))
        return 0
    if args.jobs_file:
        jobs = Path(args.jobs_file)
        jobs.parent.mkdir(parents=True, exist_ok=True)
        jobs.write_text("".join(shlex.join(r.command) + "\n" for r in runs))
        for run in runs:
            run.status = "queued"
        manifest = write_manifest(sweep_dir, args.experiment, sweep_id, args.data, runs)
        print(f"wrote {len(runs)} command lines to {jobs} and the manifest {manifest}\n"
              f"after the jobs: python analyze.py report --runs {sweep_dir} --out reports/{sweep_id}")
        return 0
    failed = run_sweep(runs, sweep_dir, args.experiment, sweep_id, args.data, args.random_init_probes)
    print_locations(runs, sweep_dir / "runs.json")
    return failed


if __name__ == "__main__":
    sys.exit(main())
