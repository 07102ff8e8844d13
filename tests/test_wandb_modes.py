"""W&B modes: offline never touches the network; online without a key or a reachable server falls back to
offline with a warning, within a few seconds (policy in docs/RELIABILITY.md)."""
import os
import socket
import time
import warnings

import pytest

from facelens.wandb_io import wandb_preflight


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on exit: nothing listens there


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")


def test_online_without_key_falls_back_to_offline_fast(monkeypatch, no_credentials):
    monkeypatch.setenv("WANDB_MODE", "online")
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="no API key.*logging offline"):
        assert wandb_preflight(timeout=2) == "offline"
    assert time.monotonic() - started < 3
    assert os.environ["WANDB_MODE"] == "offline"


def test_online_with_key_but_unreachable_server_falls_back(monkeypatch, no_credentials):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with pytest.warns(RuntimeWarning, match="cannot reach 127.0.0.1"):
        assert wandb_preflight(timeout=2) == "offline"


def test_online_with_key_and_listening_server_stays_online(monkeypatch, no_credentials, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40 + "\n")
        (tmp_path / "netrc").chmod(0o600)
        monkeypatch.setenv("WANDB_MODE", "online")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert wandb_preflight(timeout=2) == "online"


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_other_modes_are_left_alone(monkeypatch, no_credentials, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wandb_preflight(timeout=2) == mode


def test_cli_online_without_credentials_trains_offline_quickly(monkeypatch, no_credentials, tmp_path):
    """Through train.py: the logger starts offline and the run is created without waiting on the network."""

    import wandb

    import train
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="logging offline"):
        cli = train.main(["--config", "configs/quickstart.yaml", "--trainer.logger.init_args.save_dir",
                          str(tmp_path), "--trainer.default_root_dir", str(tmp_path)], run=False)
    try:
        run = cli.trainer.logger.experiment
        assert run.settings.mode == "offline" or run.offline
        assert time.monotonic() - started < 30  # building the model dominates; the network is never waited on
    finally:
        wandb.finish()
