"""Face verification and identification metrics from embeddings (framework-free)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class VerificationResult:
    roc_auc: float
    tar_at_far: dict[float, float]
    num_genuine: int
    num_impostor: int

    def to_dict(self) -> dict:
        return {"roc_auc": self.roc_auc, "tar_at_far": {str(k): v for k, v in self.tar_at_far.items()},
                "num_genuine": self.num_genuine, "num_impostor": self.num_impostor}


def cosine_scores(embeddings: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    e = F.normalize(embeddings.float(), dim=1)
    return (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(1)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic, ties counted half."""
    from scipy.stats import rankdata

    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    ranks = rankdata(scores)
    n_pos, n_neg = same.sum(), (~same).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """True accept rate at the strictest threshold whose false accept rate does not exceed `far`."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    impostor = np.sort(scores[~same])[::-1]
    if len(impostor) == 0:
        return float("nan")
    allowed = int(np.floor(far * len(impostor)))  # impostors we may accept
    threshold = impostor[allowed] if allowed < len(impostor) else -np.inf
    return float((scores[same] > threshold).mean())


def verify(embeddings: torch.Tensor, pairs: torch.Tensor, same: torch.Tensor,
           fars: tuple[float, ...] = (1e-3, 1e-2)) -> VerificationResult:
    scores = cosine_scores(embeddings, pairs).cpu().numpy()
    same_np = same.cpu().numpy().astype(bool)
    return VerificationResult(roc_auc(scores, same_np), {f: tar_at_far(scores, same_np, f) for f in fars},
                              int(same_np.sum()), int((~same_np).sum()))


def all_pairs(identities: torch.Tensor, max_impostors: int | None = 200_000, seed: int = 0):
    """Every genuine pair and up to `max_impostors` sampled impostor pairs among the given images."""
    ids = identities.cpu()
    n = len(ids)
    i, j = torch.triu_indices(n, n, offset=1)
    same = ids[i] == ids[j]
    genuine = torch.stack([i[same], j[same]], 1)
    impostor = torch.stack([i[~same], j[~same]], 1)
    if max_impostors is not None and len(impostor) > max_impostors:
        g = torch.Generator().manual_seed(seed)
        impostor = impostor[torch.randperm(len(impostor), generator=g)[:max_impostors]]
    pairs = torch.cat([genuine, impostor])
    labels = torch.cat([torch.ones(len(genuine), dtype=torch.bool), torch.zeros(len(impostor), dtype=torch.bool)])
    return pairs, labels


def identification_accuracy(gallery: torch.Tensor, gallery_ids: torch.Tensor, probes: torch.Tensor,
                            probe_ids: torch.Tensor) -> float:
    """Rank-1 accuracy of nearest-neighbour (cosine) identification of probes against a gallery."""
    sims = F.normalize(probes.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    return float((gallery_ids[sims.argmax(1)] == probe_ids).float().mean())


def read_lfw_pairs(path: str | Path) -> list[tuple[str, int, str, int]]:
    """LFW `pairs.txt`: an optional header line (`10 300` or `300`), then `name i j` (same person) or
    `name1 i name2 j` (different people). Returns (name1, index1, name2, index2); errors name file and line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) == 3:
                rows.append((parts[0], int(parts[1]), parts[0], int(parts[2])))
            elif len(parts) == 4:
                rows.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
            elif number == 1 and all(p.isdigit() for p in parts):
                continue  # header: folds and pairs per fold
            else:
                raise ValueError(f"expected 3 or 4 fields, got {len(parts)}")
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}: {line!r}") from None
    if not rows:
        raise ValueError(f"{path}: no pairs found")
    return rows
