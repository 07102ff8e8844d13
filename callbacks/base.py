"""What every analysis callback shares: a fixed probe set sharded over the ranks, a schedule, timing, outputs
beside the checkpoint, W&B logging on rank zero, and a history that survives resume."""
from __future__ import annotations

import abc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from callbacks.run_directory import run_dir


class AnalysisRankError(RuntimeError):
    """An analysis failed on some rank; raised on every rank alike, so no rank waits for the failed one."""


@dataclass(frozen=True)
class Shard:
    """This process's share of an analysis: probe items `rank, rank + world_size, ...` of the fixed probe set
    (disjoint, deterministic, no padding), and the collectives that merge the shares on the default process
    group (gloo on CPU, NCCL on CUDA). With one process everything is local and no process group is needed.

    Failure protocol: every collective starts with `exchange`, an all-gather of each rank's ok/failed flag. A
    rank that raises calls `exchange(error)` once instead of its next collective, so the flags always pair up;
    then every rank raises `AnalysisRankError` naming `where` and the failing ranks, and no rank deadlocks.
    """

    rank: int = 0
    world_size: int = 1
    where: str = "analysis"

    @classmethod
    def of(cls, trainer: pl.Trainer, where: str) -> Shard:
        world = int(trainer.world_size)
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{where}: the trainer has {world} processes but no torch.distributed process group")
        return cls(int(trainer.global_rank), world, where)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> range:
        """This rank's positions in a probe set of n items."""
        return range(self.rank, n, self.world_size)

    def exchange(self, error: BaseException | None = None) -> None:
        """Share whether this rank failed; raise on every rank when any did (one process: re-raise `error`)."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        flags = self._all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(flags) if m is not None]
        if failed:
            ranks = ", ".join(str(r) for r, _ in failed)
            details = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise AnalysisRankError(f"{self.where} failed on rank {ranks} of {self.world_size} ({details}); "
                                    f"every rank stopped the analysis") from error

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` in rank order (tensors moved to the CPU), after the flag exchange."""
        self.exchange()
        if self.world_size == 1:
            return [value]
        return self._all_gather(_to_cpu(value))

    def _all_gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def interleave(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows of the per-rank tensors (from `gather`) back in probe-set order: row j of rank r is item
        r + j * world_size."""
        n = sum(len(p) for p in parts)
        out = parts[0].new_empty((n, *parts[0].shape[1:]))
        for r, part in enumerate(parts):
            out[r::self.world_size] = part.to(out.device)
        return out


ONE_PROCESS = Shard()


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class AnalysisCallback(pl.Callback, abc.ABC):
    """Runs `analyse` on a fixed probe set every `every_n_epochs` epochs and at the last epoch.

    Subclasses implement `analyse` (calling `analysis.*`), `headline` (scalars that plot over training) and
    optionally `log_extra` (tables, figures). Results go to `<run>/analysis/<name>/epochNNN.json` and W&B
    (rank zero writes). A `sharded` subclass gets `analyse(model, batches, shard)` on every rank with that
    rank's share of the probe set and merges the partial results through `shard`, so the result equals a
    one-process run's; otherwise rank zero runs `analyse(model, batches)` over the whole probe set. Either
    way, a failure on one rank stops the analysis on all ranks (see `Shard`).
    """

    name = "analysis"
    sharded = False

    def __init__(self, every_n_epochs: int = 1, num_images: int = 256, split: str = "val", batch_size: int = 32,
                 run_on_last_epoch: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"{type(self).__name__}.every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"{type(self).__name__}.num_images must be >= 1, got {num_images}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"{type(self).__name__}.split must be train, val or test, got {split!r}")
        self.every_n_epochs, self.num_images, self.split = every_n_epochs, num_images, split
        self.batch_size, self.run_on_last_epoch = batch_size, run_on_last_epoch
        self.history: list[dict[str, Any]] = []
        self._epoch_started = 0.0
        self._last_train_seconds = 0.0

    # -- to implement ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def analyse(self, model: torch.nn.Module, batches: list[dict], shard: Shard = ONE_PROCESS) -> Any:
        """Run the analysis on the probe batches; return a result with `to_dict()`. Sharded subclasses take
        `shard` (default `ONE_PROCESS`) and return the merged result on every rank; others take no shard."""

    def headline(self, result: Any) -> dict[str, float]:
        return {}

    def log_extra(self, trainer: pl.Trainer, result: Any, epoch: int) -> None:
        """Tables and figures for the logger (rank zero only)."""

    # -- probe set ------------------------------------------------------------------------------------------
    def probe_batches(self, trainer: pl.Trainer, device: torch.device, shard: Shard | None = None) -> list[dict]:
        """The first `num_images` of the split (only `shard`'s positions when given), prepared like evaluation
        batches (centre crop, no augmentation)."""
        loader = getattr(trainer.datamodule, f"{self.split}_dataloader")()
        n = min(self.num_images, len(loader.dataset))
        return self.load_probe(trainer, loader.dataset, device, shard.indices(n) if shard else range(n),
                               loader.collate_fn)

    def load_probe(self, trainer: pl.Trainer, dataset, device: torch.device, indices: Sequence[int],
                   collate_fn=None) -> list[dict]:
        """Evaluation-prepared batches of `dataset[indices]`, in that order, on `device`."""
        batches = []
        for batch in DataLoader(Subset(dataset, indices), batch_size=self.batch_size, shuffle=False, num_workers=0,
                                collate_fn=collate_fn):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            batches.append(prepare_eval_batch(trainer.datamodule, batch))
        return batches

    # -- schedule -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_started = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # up to the last batch: other callbacks' epoch-end analyses are not training time
        self._last_train_seconds = self._last_batch_end - self._epoch_started
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not (self.run_on_last_epoch and (last or trainer.should_stop)):
            return
        self.run_now(trainer, pl_module, epoch)

    def run_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
                shard: Shard | None = None) -> Any:
        """Run on every rank (`shard` defaults to the trainer's rank and world size); returns the result on
        rank zero (and on every rank when sharded)."""
        shard = shard or Shard.of(trainer, f"{type(self).__name__} (epoch {epoch})")
        try:
            result = self._run(trainer, pl_module, epoch, shard)
        except AnalysisRankError:
            raise
        except Exception as err:  # every failure must reach the other ranks
            shard.exchange(err)
        shard.exchange()  # the analysis is over on every rank (replaces a barrier)
        return result

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, shard: Shard) -> Any:
        started = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                if self.sharded:
                    result = self.analyse(pl_module, self.probe_batches(trainer, pl_module.device, shard), shard)
                elif shard.is_zero:
                    result = self.analyse(pl_module, self.probe_batches(trainer, pl_module.device))
                else:
                    result = None
        finally:
            pl_module.train(was_training)
        if not shard.is_zero:
            return result
        self.save(trainer, result, epoch)
        self.log_extra(trainer, result, epoch)
        seconds = time.perf_counter() - started  # the whole cost: probe set, analysis, files, figures, tables
        scalars = {f"{self.name}/{k}": float(v) for k, v in self.headline(result).items()}
        scalars[f"{self.name}/seconds"] = seconds
        if self._last_train_seconds > 0:
            scalars[f"{self.name}/share_of_epoch"] = seconds / self._last_train_seconds
        self.history.append({"epoch": epoch, "step": trainer.global_step, **scalars})
        write_json(self.folder(trainer) / "history.json", self.history)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        return result

    def folder(self, trainer: pl.Trainer) -> Path:
        folder = run_dir(trainer) / "analysis" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save(self, trainer: pl.Trainer, result: Any, epoch: int) -> Path:
        path = self.folder(trainer) / f"epoch{epoch:03d}.json"
        write_json(path, result.to_dict() if hasattr(result, "to_dict") else result)
        return path

    # -- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def prepare_eval_batch(datamodule, batch: dict) -> dict:
    """Apply the datamodule's evaluation-time batch transform (e.g. CelebA's centre crop), never augmentation."""
    transform = getattr(datamodule, "transform_batch", None)
    return transform(batch, train=False) if transform is not None else batch


def write_json(path: Path, payload: Any) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_plain))
    tmp.replace(path)


def _plain(value: Any):
    if torch.is_tensor(value):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
