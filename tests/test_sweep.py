"""`train.py sweep`: the command lines and W&B grouping of each experiment, jobs files, and a tiny real sweep."""
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

import experiments
from experiments import find_run_dir, plan, read_manifest

REPO = Path(__file__).resolve().parent.parent


def option(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, (name, cmd)
    return cmd[cmd.index(name) + 1]


def configs(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("kind", ["eyeglasses", "grayscale"])
def test_bias_series_commands(kind):
    runs = plan(kind, "s1", python="py")
    assert [r.name for r in runs] == [f"{kind}_P{p}" for p in (50, 60, 70, 80, 90, 100)]
    for run, p in zip(runs, (50, 60, 70, 80, 90, 100)):
        cmd = run.command
        assert cmd[:3] == ["py", "train.py", "fit"] and configs(cmd) == [f"configs/bias_{kind}.yaml"]
        assert option(cmd, "--data.init_args.p") == str(p) and run.p == p
        assert option(cmd, "--trainer.logger.init_args.group") == "s1"
        assert option(cmd, "--trainer.logger.init_args.name") == run.name
        assert option(cmd, "--trainer.default_root_dir") == os.path.join("sweeps", "s1", run.name) == run.root
        assert "--data.init_args.source" not in cmd


def test_celeba_overlays_and_extra_overrides_come_last():
    runs = plan("grayscale", "g", "celeba", "/data/celeba", [50, 100], ["configs/demo.yaml"],
                ["--trainer.max_epochs", "2"], python="py")
    assert [r.p for r in runs] == [50, 100]
    cmd = runs[1].command
    assert configs(cmd) == ["configs/bias_grayscale.yaml", "configs/demo.yaml"]
    assert option(cmd, "--data.init_args.source") == "celeba" and option(cmd, "--data.init_args.root") == "/data/celeba"
    assert cmd[-2:] == ["--trainer.max_epochs", "2"]


@pytest.mark.parametrize("data,prefix", [("synthfaces", "affact_synth"), ("celeba", "affact")])
def test_affact_pair(data, prefix):
    runs = plan("affact", "a", data, "/c" if data == "celeba" else None, python="py")
    assert [(r.name, r.variant, r.p) for r in runs] == [("affact_balanced", "balanced", None),
                                                         ("affact_unbalanced", "unbalanced", None)]
    assert [configs(r.command) for r in runs] == [[f"configs/{prefix}_balanced.yaml"],
                                                  [f"configs/{prefix}_unbalanced.yaml"]]
    assert all(option(r.command, "--trainer.logger.init_args.group") == "a" for r in runs)
    assert ("--data.init_args.root" in runs[0].command) == (data == "celeba")
    assert "--data.init_args.source" not in runs[0].command


@pytest.mark.parametrize("kwargs,message", [
    ({"experiment": "eyeglasses", "data": "celeba"}, "needs --root"),
    ({"experiment": "eyeglasses", "root": "/x"}, "--root is for --data celeba"),
    ({"experiment": "eyeglasses", "ps": [40]}, "outside 50..100"),
    ({"experiment": "affact", "ps": [50]}, "not affact"),
    ({"experiment": "eyeglasses", "overlays": ["configs/nope.yaml"]}, "nope.yaml does not exist"),
    ({"experiment": "eyeglasses", "sweep_id": "a/b"}, "--sweep-id"),
])
def test_bad_options_are_named(kwargs, message):
    kwargs = {"sweep_id": "s", **kwargs}
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    assert experiments.main(["--experiment", "eyeglasses", "--p", "50", "100", "--sweep-id", "d",
                             "--out", str(tmp_path), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and "--data.init_args.p 100" in lines[1] and "group d" in lines[1]
    assert not any(tmp_path.iterdir())


def test_jobs_file_and_manifest(tmp_path):
    jobs = tmp_path / "jobs.txt"
    assert experiments.main(["--experiment", "affact", "--sweep-id", "j", "--out", str(tmp_path),
                             "--jobs-file", str(jobs)]) == 0
    lines = jobs.read_text().splitlines()
    assert len(lines) == 2 and shlex.split(lines[0])[1:4] == ["train.py", "fit", "--config"]
    manifest = read_manifest(tmp_path / "j")
    assert manifest["wandb_group"] == "j" and [r["status"] for r in manifest["runs"]] == ["queued", "queued"]
    assert [r["run_dir"] for r in manifest["runs"]] == [None, None]
    # a job finished elsewhere is found under its root
    done = Path(manifest["runs"][0]["root"]) / "runs" / "abc"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert read_manifest(tmp_path / "j")["runs"][0]["run_dir"] == str(done)


def test_tiny_real_sweep_writes_runs_json(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.pool_size", "160", "--data.init_args.num_val", "64", "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "8", "--model.init_args.backbone", "resnet18"]
    code = experiments.main(["--experiment", "eyeglasses", "--p", "50", "100", "--sweep-id", "tiny",
                             "--out", str(tmp_path / "sweeps"), "--", *tiny])
    assert code == 0
    manifest = json.loads((tmp_path / "sweeps" / "tiny" / "runs.json").read_text())
    assert manifest["experiment"] == "eyeglasses" and manifest["wandb_group"] == "tiny"
    assert [(r["name"], r["p"], r["status"], r["returncode"]) for r in manifest["runs"]] == [
        ("eyeglasses_P50", 50, "done", 0), ("eyeglasses_P100", 100, "done", 0)]
    for r in manifest["runs"]:
        folder = Path(r["run_dir"])
        assert folder == find_run_dir(r["root"]) and (folder / "checkpoints" / "last.ckpt").is_file()
        summary = json.loads((folder / "summary.json").read_text())
        assert "val/bias/gap" in summary["metrics"]
        import yaml

        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["init_args"]["p"] == r["p"]
        assert config["trainer"]["logger"]["init_args"]["group"] == "tiny"
        assert config["trainer"]["logger"]["init_args"]["name"] == r["name"]
    assert sys.executable in manifest["runs"][0]["command"][0]


def test_random_init_probe_command_follows_the_run_config(tmp_path):
    import yaml

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    probing = {"class_path": "callbacks.probing.ProbingCallback",
               "init_args": {"layers": "blocks", "attributes": ["Male", "Eyeglasses"], "n_train": 64, "n_val": 32,
                             "num_images": 256}}
    for data, expected in (({"source": "synthfaces", "root": None, "image_size": 48}, ["--data", "synthfaces"]),
                           ({"source": "celeba", "root": "/c", "image_size": 96}, ["--data", "celeba", "--root", "/c"])):
        (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [probing]},
                                                          "data": {"init_args": data}}))
        cmd = experiments.probe_random_init(run, "py")
        assert cmd[2:4] == ["probe", "--checkpoint"] and "--compare-random" in cmd
        assert cmd[cmd.index("--data"):cmd.index("--data") + len(expected)] == expected
        assert option(cmd, "--size") == str(data["image_size"]) and option(cmd, "--n-train") == "64"
        assert option(cmd, "--out") == str(run / "analysis" / "probing_random_init")
        assert cmd[cmd.index("--attributes") + 1:] == ["Male", "Eyeglasses"] and option(cmd, "--layers") == "blocks"
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    assert experiments.probe_random_init(run, "py") is None
