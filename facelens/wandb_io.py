"""W&B setup shared by the entry points, the step-aligned logger, and a reader for offline runs (no network, no
login)."""
from __future__ import annotations

import json
import netrc
import os
import re
import socket
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only


def default_offline() -> None:
    """Offline unless the user chose a mode; `WANDB_MODE=disabled` or `online` are respected."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


DEFAULT_BASE_URL = "https://api.wandb.ai"


@contextmanager
def offline_wandb(directory: str | Path) -> Iterator[None]:
    """W&B offline and silent, writing under `directory`, for a script or test; the caller's settings come back
    afterwards (W&B reads them from the environment when a run starts)."""
    keys = ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(directory), WANDB_SILENT="true")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")  # [offline-]run-<YYYYMMDD_HHMMSS>-<id>


@dataclass
class OfflineRun:
    """One W&B run read back from disk; `directories` are its folders in time order (several after a resume)."""
    run_id: str
    directories: list[Path]
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.directories[-1]

    def metric(self, key: str) -> list:
        """Values of one history key in step order."""
        return [row[key] for row in self.history if key in row]

    def media(self, pattern: str = "*") -> list[Path]:
        return sorted(p for d in self.directories for p in (d / "files" / "media").rglob(pattern))


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _load(value_json: str):
    try:
        return json.loads(value_json)
    except json.JSONDecodeError:
        return value_json


def _time_order(folder: Path) -> tuple[str, str]:
    match = _RUN_FOLDER.match(folder.name)
    return (match.group(1) if match else "", folder.name)


def _run_id(folder: Path) -> str:
    match = _RUN_FOLDER.match(folder.name)
    if match:
        return match.group(2)
    return next(folder.glob("run-*.wandb")).stem.removeprefix("run-")


def find_runs(root: str | Path) -> list[Path]:
    """Run directories (holding run-<id>.wandb) under `root`, oldest first."""
    root = Path(root)
    if list(root.glob("run-*.wandb")):
        return [root]
    return sorted({p.parent for p in root.rglob("run-*.wandb")}, key=_time_order)


def run_folders(root: str | Path, run_id: str) -> list[Path]:
    """Every folder of one W&B run id under `root`, oldest first: the first process's and one per resume."""
    return [p for p in find_runs(root) if _run_id(p) == run_id]


def _read_folder(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    logs = list(folder.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no W&B run (run-*.wandb) in {folder}")
    run = OfflineRun(run_id=logs[0].stem.removeprefix("run-"), directories=[folder])
    for payload in _payloads(logs[0]):
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


def merge_runs(parts: Sequence[OfflineRun]) -> OfflineRun:
    """The folders of one run id, oldest first, as one run with one history row per W&B `_step`.

    A step logged by several processes (a killed one and the one that resumed it) keeps the first process's values;
    keys only a later process logged at that step are added. First wins because W&B online does the same: a
    resumed run starts at the server's last step + 1 and ignores lower steps. Config and summary: later wins (the
    summary holds the latest values). Only folders whose `_step` is the trainer step (`StepAlignedWandbLogger`)
    can be merged by step; others are refused, since their `_step` counts log calls."""
    if not parts:
        raise ValueError("merge_runs: no W&B run folders given")
    ids = {part.run_id for part in parts}
    if len(ids) > 1:
        raise ValueError(f"merge_runs: folders of different W&B runs {sorted(ids)}: "
                         f"{[str(d) for part in parts for d in part.directories]}")
    merged = OfflineRun(run_id=parts[0].run_id, directories=[d for part in parts for d in part.directories])
    rows: dict[int, dict] = {}
    for part in parts:
        for row in part.history:
            if len(parts) > 1 and "trainer/global_step" in row and row["trainer/global_step"] != row.get("_step"):
                raise ValueError(f"{part.directory}: history row with _step {row.get('_step')} but trainer/global_step "
                                 f"{row['trainer/global_step']}; folders of one run can only be merged by step when "
                                 f"logged with facelens.wandb_io.StepAlignedWandbLogger")
            if "_step" not in row:
                raise ValueError(f"{part.directory}: history row without _step: {sorted(row)[:5]}")
            kept = rows.setdefault(row["_step"], {})
            for key, value in row.items():
                kept.setdefault(key, value)
        merged.config.update(part.config)
        merged.summary.update(part.summary)
    merged.history = [rows[step] for step in sorted(rows)]
    return merged


def read_offline_run(source: str | Path | Sequence[str | Path]) -> OfflineRun:
    """History, config and summary of one W&B run, read back from its `run-<id>.wandb` files (no network).

    `source`: one run folder (read alone); a list of run folders of one id (merged, see `merge_runs`); or a root
    such as `<save_dir>/wandb` (the newest run there, merged with every earlier folder of the same id)."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        runs = find_runs(root)
        if not runs:
            raise FileNotFoundError(f"no W&B run (run-*.wandb) under {root}")
        folders = runs if runs == [root] else run_folders(root, _run_id(runs[-1]))
    else:
        folders = sorted((Path(p) for p in source), key=_time_order)
    return merge_runs([_read_folder(folder) for folder in folders])


class _StepAlignedRun:
    """The W&B run as `logger.experiment` hands it out: `log` goes through the logger's rows (so callbacks that
    call `logger.experiment.log(..., step=...)` directly follow the same step rules); the rest is the run's."""

    def __init__(self, run, logger: StepAlignedWandbLogger) -> None:
        self._run, self._logger = run, logger

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        self._logger._log_row(dict(data), step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)


class StepAlignedWandbLogger(WandbLogger):
    """WandbLogger whose W&B `_step` is the logged trainer step, so a resumed run has no duplicate steps.

    - Everything logged at one trainer step is one W&B row (`wandb.log(..., step=step)`, with `trainer/global_step`).
    - Steps the run already holds are skipped: online, below W&B's `starting_step` (the server's last step + 1);
      offline, up to the last `_step` in the earlier folders of this run id on disk. The first process's rows win.
    - Rows are written in step order although Lightning logs out of order by one: callbacks log at
      `trainer.global_step` (e.g. step 4) before Lightning logs the epoch's validation and epoch-end metrics at its
      step - 1 (step 3). W&B keeps one row open and ignores lower steps, so the newest row is held back here until
      a higher step arrives (or `finalize`), and step 3 still reaches its row. A step below W&B's open row (never
      seen with Lightning) joins that row. `step=None` joins the newest row.
    - `experiment.log` goes through the same rules (`_StepAlignedRun`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_new_step: int | None = None
        self._held: tuple[int, dict] | None = None  # the newest row, not yet sent
        self._sent: int | None = None  # W&B's open row: the last step sent

    @property
    def experiment(self):
        run = WandbLogger.experiment.fget(self)
        return run if rank_zero_only.rank != 0 else _StepAlignedRun(run, self)

    def _resume_step(self, run) -> int:
        """First step this process may log: one past what earlier processes of the same run id have kept."""
        if getattr(run, "disabled", False):
            return 0
        start = int(run.starting_step or 0)
        if getattr(run, "offline", False):
            folder = Path(run.dir).parent
            earlier = [p for p in run_folders(folder.parent, run.id) if p != folder]
            steps = [row["_step"] for part in earlier for row in _read_folder(part).history if "_step" in row]
            start = max([start, *(s + 1 for s in steps)])
        return start

    def _send(self, step: int, data: dict) -> None:
        WandbLogger.experiment.fget(self).log({**data, "trainer/global_step": step}, step=step)
        self._sent = step

    def _log_row(self, data: dict, step: int | None) -> None:
        if self._first_new_step is None:
            self._first_new_step = self._resume_step(WandbLogger.experiment.fget(self))
        if step is None:
            step = self._held[0] if self._held else self._first_new_step if self._sent is None else self._sent
        if step < self._first_new_step:
            return  # already in the run: logged by the process this one resumes
        if self._held and step == self._held[0]:
            self._held[1].update(data)
        elif self._sent is not None and step <= self._sent:
            self._send(self._sent, data)
        elif self._held and step < self._held[0]:
            self._send(step, data)
        else:
            self.flush()
            self._held = (step, data)

    def flush(self) -> None:
        """Send the held row to W&B (at the end of a stage; `finalize` calls it)."""
        if self._held is not None:
            step, data = self._held
            self._held = None
            self._send(step, data)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self._log_row(dict(metrics), step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.flush()
        super().finalize(status)
