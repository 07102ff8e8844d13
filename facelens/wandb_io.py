"""W&B setup shared by the entry points, and a reader for offline runs (no network, no login)."""
from __future__ import annotations

import json
import netrc
import os
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


def default_offline() -> None:
    """Offline unless the user chose a mode; `WANDB_MODE=disabled` or `online` are respected."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


DEFAULT_BASE_URL = "https://api.wandb.ai"


def _has_api_key(base_url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(base_url).hostname or ""
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(base_url: str, timeout: float) -> str | None:
    """None when a TCP connection to the W&B server opens within `timeout` seconds, else the reason."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {parts.hostname}:{port} ({err})"


def wandb_preflight(timeout: float = 3.0) -> str:
    """Before a logger starts: in online mode without an API key or without a reachable server, switch to
    offline with a warning (the run can be uploaded later with `wandb sync`), so a job never hangs on the
    network. Returns the mode in effect. `WANDB_MODE` other than `online` is left alone."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode != "online":
        return mode
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    problem = None if _has_api_key(base_url) else "no API key (set WANDB_API_KEY or run `wandb login`)"
    problem = problem or _reachable(base_url, timeout)
    if problem is None:
        return mode
    os.environ["WANDB_MODE"] = "offline"
    warnings.warn(f"W&B: WANDB_MODE=online but {problem} for {base_url}; logging offline instead. "
                  f"Upload later with `wandb sync <run folder>`.", RuntimeWarning, stacklevel=2)
    return "offline"


_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_RECORD = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(path: Path):
    """Yield each record's bytes from a W&B transaction log (LevelDB-style 32 KiB blocks)."""
    data = path.read_bytes()
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (bad header)")
    pos, pending = _HEADER.size, b""
    while pos + _RECORD.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD.size:
            pos += room
            continue
        crc, length, kind = _RECORD.unpack_from(data, pos)
        if length == 0 and kind == 0:
            pos += room  # zero padding to the block end
            continue
        start = pos + _RECORD.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            break  # a run still being written: stop at the last complete record
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    run_id: str
    directory: Path
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def metric(self, key: str) -> list:
        """Values of one history key in logging order."""
        return [row[key] for row in self.history if key in row]

    def media(self, pattern: str = "*") -> list[Path]:
        return sorted((self.directory / "files" / "media").rglob(pattern))


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _load(value_json: str):
    try:
        return json.loads(value_json)
    except json.JSONDecodeError:
        return value_json


def find_runs(root: str | Path) -> list[Path]:
    """Run directories (holding run-<id>.wandb) under `root`, oldest first."""
    root = Path(root)
    if list(root.glob("run-*.wandb")):
        return [root]
    return sorted({p.parent for p in root.rglob("run-*.wandb")}, key=lambda p: p.name)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """History, config and summary of one offline run, read back from its `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = find_runs(run_dir)
    if not runs:
        raise FileNotFoundError(f"no W&B run (run-*.wandb) under {run_dir}")
    directory = runs[-1]
    log = next(directory.glob("run-*.wandb"))
    run = OfflineRun(run_id=log.stem.removeprefix("run-"), directory=directory)
    for payload in _payloads(log):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): _load(i.value_json) for i in record.history.item})
        elif kind == "config":
            run.config.update({_key(i): _load(i.value_json) for i in record.config.update})
        elif kind == "run":
            run.config.update({_key(i): _load(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): _load(i.value_json) for i in record.summary.update})
    return run
