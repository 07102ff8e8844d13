"""RecognitionModule: identity classification (softmax or ArcFace) with embeddings for verification."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from analysis.verification import all_pairs, verify
from lightning_modules.backbones import check_backbone, create_backbone


class ArcFaceHead(nn.Module):
    """Additive angular margin (Deng et al. 2019): the target logit becomes s cos(theta + m), others s cos(theta).

    Past theta + m > pi the margin would make the logit grow again, so there (as in ArcFace's reference
    training code) the target logit is s (cos theta - m sin m) instead.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1, 1)
        if labels is None:
            return self.scale * cos
        sin = (1 - cos.square()).clamp_min(0).sqrt()
        m = self.margin
        with_margin = cos * math.cos(m) - sin * math.sin(m)
        with_margin = torch.where(cos > math.cos(math.pi - m), with_margin, cos - m * math.sin(m))
        target = F.one_hot(labels, cos.shape[1]).bool()
        return self.scale * torch.where(target, with_margin, cos)


def first_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first copy of each sample index (negative = unknown, always kept).

    DistributedSampler pads the last ranks with repeated samples; a repeat would pair an image with itself.
    """
    index = index.cpu()
    seen: set[int] = set()
    keep = []
    for position, value in enumerate(index.tolist()):
        if value < 0 or value not in seen:
            keep.append(position)
            seen.add(value)
    return torch.tensor(keep, dtype=torch.long)


class RecognitionModule(pl.LightningModule):
    """Face recognition by identity classification (seed 003 section 5.1.1 recipe by default).

    Args:
        backbone: timm model name (resnet50, mobilenetv2_100, vgg16, ...).
        num_identities: classes; None takes `datamodule.num_identities` at fit time.
        head: "softmax" (cross-entropy on a linear classifier) or "arcface" (additive angular margin).
        embedding_dim: embedding size for the ArcFace head (softmax uses the pooled backbone features).
    """

    def __init__(self, backbone: str = "resnet50", num_identities: int | None = None, head: str = "softmax",
                 embedding_dim: int = 512, margin: float = 0.5, scale: float = 64.0, optimizer: str = "sgd",
                 lr: float = 0.005, momentum: float = 0.9, weight_decay: float = 5e-4, plateau_patience: int = 2,
                 pretrained_path: str | None = None, channels_last: bool = False, far_levels: list[float] | None = None):
        super().__init__()
        check_backbone(backbone, "model.backbone")
        if head not in ("softmax", "arcface"):
            raise ValueError(f"model.head: {head!r} is not one of 'softmax', 'arcface'")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"model.optimizer: {optimizer!r} is not one of 'sgd', 'adamw'")
        if num_identities is not None and num_identities < 2:
            raise ValueError(f"model.num_identities: need at least 2 identities, got {num_identities}")
        self.save_hyperparameters()
        self.far_levels = tuple(far_levels or (1e-3, 1e-2))
        self.net: nn.Module | None = None
        self.arcface: ArcFaceHead | None = None
        self._val_embeddings: list[torch.Tensor] = []
        self._val_identities: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self._pair_embeddings: list[torch.Tensor] = []
        self._pair_index: list[torch.Tensor] = []
        if num_identities is not None:
            self._build(num_identities)

    def _build(self, num_identities: int) -> None:
        hp = self.hparams
        hp.num_identities = num_identities
        if hp.head == "softmax":
            self.net = create_backbone(hp.backbone, num_identities, hp.pretrained_path)
        else:
            self.net = create_backbone(hp.backbone, hp.embedding_dim, hp.pretrained_path)
            self.arcface = ArcFaceHead(hp.embedding_dim, num_identities, hp.scale, hp.margin)
        if hp.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        if self.net is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            count = getattr(datamodule, "num_identities", None)
            if count is None:
                raise ValueError("model.num_identities is not set and the datamodule does not provide num_identities")
            self._build(int(count))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Face embeddings: pooled features (softmax) or the projection fed to the margin head (ArcFace)."""
        return self.net.embed(images) if self.arcface is None else self.net(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Identity logits (without margin), so analyses treat this like any classifier."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = self.net(images)
        return out if self.arcface is None else self.arcface(out)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["identity"]
        if self.arcface is None:
            logits = self.net(batch["image"])
        else:
            logits = self.arcface(self.net(batch["image"]), labels)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        n = labels.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/accuracy", accuracy, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:  # images of a pairs file: only their embeddings are needed
            self._pair_embeddings.append(self.embed(batch["image"]).detach().float())
            self._pair_index.append(batch["index"].detach())
            return
        labels = batch["identity"]
        if self.arcface is None:
            embeddings, logits = self.net.embed_and_classify(batch["image"])
        else:
            embeddings = self.net(batch["image"])
            logits = self.arcface(embeddings)
        n = labels.shape[0]
        self.log("val/loss", F.cross_entropy(logits.float(), labels), on_epoch=True, batch_size=n, sync_dist=True,
                 add_dataloader_idx=False)
        self.log("val/identification_accuracy", (logits.argmax(1) == labels).float().mean(), on_epoch=True,
                 batch_size=n, sync_dist=True, prog_bar=True, add_dataloader_idx=False)
        self._val_embeddings.append(embeddings.detach().float())
        self._val_identities.append(labels.detach())
        self._val_index.append(batch["index"].detach() if "index" in batch
                               else torch.full_like(labels, -1))

    def on_validation_epoch_end(self) -> None:
        self._score_pairs_file()
        if not self._val_embeddings:
            return
        embeddings = torch.cat(self._val_embeddings)
        identities = torch.cat(self._val_identities)
        index = torch.cat(self._val_index)
        self._val_embeddings, self._val_identities, self._val_index = [], [], []
        if self.trainer.world_size > 1:  # every rank scores all pairs of the gathered validation set
            embeddings = self.all_gather(embeddings).flatten(0, 1)
            identities = self.all_gather(identities).flatten(0, 1)
            keep = first_occurrence(self.all_gather(index).flatten(0, 1))
            embeddings, identities = embeddings[keep], identities[keep]
        pairs, same = all_pairs(identities)
        result = verify(embeddings, pairs, same, self.far_levels)
        values = {"val/verification_auc": result.roc_auc}
        values.update({f"val/tar@far={far:g}": tar for far, tar in result.tar_at_far.items()})
        self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}, add_dataloader_idx=False)

    def _score_pairs_file(self) -> None:
        """Verification on the datamodule's listed pairs (e.g. LFW pairs.txt), logged as val/pairs_*."""
        if not self._pair_embeddings:
            return
        embeddings, index = torch.cat(self._pair_embeddings), torch.cat(self._pair_index)
        self._pair_embeddings, self._pair_index = [], []
        if self.trainer.world_size > 1:
            embeddings = self.all_gather(embeddings).flatten(0, 1)
            index = self.all_gather(index).flatten(0, 1)
        datamodule = self.trainer.datamodule
        ordered = torch.zeros(int(index.max()) + 1, embeddings.shape[1], device=embeddings.device)
        ordered[index] = embeddings  # padded repeats write the same row again
        result = verify(ordered, datamodule.pairs.to(ordered.device), datamodule.pairs_same, self.far_levels)
        values = {"val/pairs_auc": result.roc_auc}
        values.update({f"val/pairs_tar@far={far:g}": tar for far, tar in result.tar_at_far.items()})
        self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}, add_dataloader_idx=False)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=hp.plateau_patience)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facelens_module"] = type(self).__name__
