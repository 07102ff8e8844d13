"""AttributeModule: N facial-attribute logits from any timm backbone (AFFACT: ResNet-50 + 40 outputs)."""
from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from analysis.attribute_metrics import AttributeReport
from facelens.attributes import CELEBA_ATTRIBUTES, attribute_indices, resolve_attributes
from lightning_modules.backbones import check_backbone, create_backbone
from lightning_modules.losses import attribute_loss
from lightning_modules.metrics import AttributeConfusion

OPTIMIZERS = ("adamw", "sgd")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCHEDULERS = ("cosine", "plateau", "none")


class AttributeModule(pl.LightningModule):
    """Multi-label attribute classifier.

    Args:
        backbone: timm model name (resnet50, resnet18, mobilenetv2_100, vgg16, ...).
        attributes: attribute names to predict (CelebA names; None = all 40, or e.g. ["Male"]).
        loss: "unbalanced" (BCE with logits) or "balanced" (MOON-style weighting toward `target_rate`).
        target_rate: target positive rate for the balanced loss (0.5 = both classes equally weighted).
        source_rates: training positive rate per attribute; None asks the datamodule (`positive_rates()`).
        moon_sampling: keep errors by Bernoulli draws as in MOON instead of weighting by their probability.
        pretrained_path: local weights file for the backbone (nothing is downloaded).
        channels_last: network weights and inputs in channels-last memory format (faster convolutions with
            bf16 on tensor cores).
        compile: run training and evaluation steps through `torch.compile(self.net)` (`compile_mode` for the
            inductor backend, `compile_backend` any dynamo backend). `self.net` itself stays the eager module,
            so layer names, state_dict keys and checkpoints are unchanged, and a forward pass falls back to it
            whenever a hook is attached to any of its layers: a compiled graph silently skips hooks added after
            it was compiled, so analyses (Grad-CAM, probing, dissection hooks) always see every layer.
    """

    def __init__(self, backbone: str = "resnet50", attributes: list[str] | None = None, loss: str = "unbalanced",
                 target_rate: float = 0.5, source_rates: dict[str, float] | None = None,
                 moon_sampling: bool = False, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 1e-4, momentum: float = 0.9, scheduler: str = "cosine",
                 warmup_epochs: int = 0, pretrained_path: str | None = None, channels_last: bool = False,
                 compile: bool = False, compile_mode: str = "default", compile_backend: str = "inductor"):
        super().__init__()
        self.attribute_names = resolve_attributes(attributes, "model.attributes")
        check_backbone(backbone, "model.backbone")
        if loss not in ("balanced", "unbalanced"):
            raise ValueError(f"model.loss: {loss!r} is not one of 'balanced', 'unbalanced'")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer: {optimizer!r} is not one of {OPTIMIZERS}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"model.scheduler: {scheduler!r} is not one of {SCHEDULERS}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode: {compile_mode!r} is not one of {COMPILE_MODES}")
        if compile:
            from torch import _dynamo

            if compile_backend not in _dynamo.list_backends(exclude_tags=()):
                raise ValueError(f"model.compile_backend: {compile_backend!r} is not a torch.compile backend; "
                                 f"available: {_dynamo.list_backends()}")
        if not 0 < target_rate < 1:
            raise ValueError(f"model.target_rate: {target_rate} must lie strictly between 0 and 1")
        if source_rates is not None:
            resolve_attributes(list(source_rates), "model.source_rates")
        self.save_hyperparameters()
        self.net = create_backbone(backbone, len(self.attribute_names), pretrained_path)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.register_buffer("label_index", torch.tensor(attribute_indices(self.attribute_names)), persistent=False)
        self.register_buffer("source_rate", torch.full((len(self.attribute_names),), 0.5))
        if source_rates is not None:
            self._set_source_rates(source_rates)
        self.val_stats = AttributeConfusion(len(self.attribute_names))
        self.test_stats = AttributeConfusion(len(self.attribute_names))
        self.last_report: AttributeReport | None = None

    # -- data -------------------------------------------------------------------------------------------------
    def _set_source_rates(self, rates: dict[str, float]) -> None:
        missing = [n for n in self.attribute_names if n not in rates]
        if missing:
            raise ValueError(f"model.source_rates: no rate for {missing}")
        self.source_rate.copy_(torch.tensor([float(rates[n]) for n in self.attribute_names]))

    def setup(self, stage: str) -> None:
        if self.hparams.loss == "balanced" and self.hparams.source_rates is None and stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "positive_rates"):
                raise ValueError("model.loss=balanced needs model.source_rates or a datamodule with positive_rates()")
            self._set_source_rates(datamodule.positive_rates())

    def select(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets and known-label mask for this model's attributes."""
        return batch["attributes"][:, self.label_index], batch["attribute_mask"][:, self.label_index]

    # -- model ------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._network()(images)

    def _network(self) -> torch.nn.Module:
        """The compiled network (built on first use), or the eager one when compile is off or a hook is set."""
        hp = self.hparams
        if not hp.compile or _has_hooks(self.net):
            return self.net
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None:
            mode = hp.compile_mode if hp.compile_backend == "inductor" else None
            compiled = torch.compile(self.net, mode=mode, backend=hp.compile_backend)
            self.__dict__["_compiled_net"] = compiled  # not a registered submodule: state_dict keys unchanged
        return compiled

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_compiled_net", None)  # compiled graphs do not pickle; rebuilt on first use
        return state

    def _loss(self, logits, targets, mask) -> torch.Tensor:
        return attribute_loss(logits.float(), targets, mask, self.hparams.loss, self.source_rate,
                              torch.full_like(self.source_rate, self.hparams.target_rate),
                              sampling=self.hparams.moon_sampling and self.training)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        targets, mask = self.select(batch)
        logits = self(batch["image"])
        loss = self._loss(logits, targets, mask)
        error = (((logits > 0).float() != targets) & mask).sum() / mask.sum().clamp_min(1)
        n = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/error", error, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: dict, stats: AttributeConfusion, prefix: str) -> torch.Tensor:
        targets, mask = self.select(batch)
        logits = self(batch["image"])
        loss = self._loss(logits, targets, mask)
        stats.update(logits, targets, mask)
        self.log(f"{prefix}/loss", loss, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.val_stats, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_stats, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"])

    def _epoch_report(self, stats: AttributeConfusion, prefix: str) -> None:
        counts = stats.compute()  # (T, 4): tp, fp, tn, fn, summed across ranks
        stats.reset()
        tp, fp, tn, fn = (counts[:, i].cpu().numpy() for i in range(4))
        report = AttributeReport.from_counts(self.attribute_names, tp, fp, tn, fn)
        self.last_report = report
        values = {f"{prefix}/mean_error": report.mean_error,
                  f"{prefix}/mean_balanced_error": report.mean_balanced_error,
                  f"{prefix}/majority_baseline_error": report.mean_majority_error}
        for i, name in enumerate(self.attribute_names):
            if report.support[i] > 0:
                values[f"{prefix}/error/{name}"] = float(report.error_rate[i])
                values[f"{prefix}/balanced_accuracy/{name}"] = float(report.balanced_accuracy[i])
        self.log_dict(values, rank_zero_only=False)
        log_table = getattr(self.logger, "log_table", None)
        if log_table is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log_table(key=f"{prefix}/attributes", columns=list(AttributeReport.COLUMNS), data=report.to_table())

    def on_validation_epoch_end(self) -> None:
        self._epoch_report(self.val_stats, "val")

    def on_test_epoch_end(self) -> None:
        self._epoch_report(self.test_stats, "test")

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
        epochs = max(1, self.trainer.max_epochs or 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - hp.warmup_epochs))
        if hp.warmup_epochs > 0:
            warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=hp.warmup_epochs)
            cosine = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[hp.warmup_epochs])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facelens_module"] = type(self).__name__

    @property
    def attributes(self) -> Sequence[str]:
        return self.attribute_names


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether any forward / backward hook is registered on `module` or a sub-module (or globally)."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


__all__ = ["AttributeModule", "CELEBA_ATTRIBUTES"]
