import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from analysis.verification import all_pairs, identification_accuracy, read_lfw_pairs, tar_at_far, verify
from lightning_modules.recognition_module import ArcFaceHead, RecognitionModule


def test_arcface_logits_match_hand_computation():
    head = ArcFaceHead(embedding_dim=2, num_classes=3, scale=10.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb = torch.tensor([[math.cos(0.3), math.sin(0.3)], [-1.0, 0.0]])
    logits = head(emb, torch.tensor([0, 0]))
    # sample 0: angle to class 0 is 0.3 rad -> target logit 10 cos(0.8); others plain cosines
    expected0 = [10 * math.cos(0.8), 10 * math.sin(0.3), -10 * math.cos(0.3)]
    # sample 1: angle to class 0 is pi, beyond pi - m: fallback 10 (cos(pi) - m sin m)
    expected1 = [10 * (-1 - 0.5 * math.sin(0.5)), 0.0, 10.0]
    torch.testing.assert_close(logits, torch.tensor([expected0, expected1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(emb)[0, 1:], logits[0, 1:])


def test_verification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    ids = torch.tensor(np.repeat(np.arange(30), 4))
    centres = rng.normal(size=(30, 16))
    emb = torch.tensor(centres[ids.numpy()] + rng.normal(scale=1.2, size=(120, 16)), dtype=torch.float32)
    pairs, same = all_pairs(ids)
    result = verify(emb, pairs, same, fars=(1e-3, 1e-2, 0.1))
    e = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    scores = (e[pairs[:, 0]] * e[pairs[:, 1]]).sum(1)
    assert result.roc_auc == pytest.approx(roc_auc_score(same.numpy(), scores), abs=1e-9)
    fpr, tpr, _ = roc_curve(same.numpy(), scores)
    for far in (1e-3, 1e-2, 0.1):
        # highest TPR reachable with FPR <= far; our threshold is strictly above the allowed impostors
        assert result.tar_at_far[far] == pytest.approx(tpr[fpr <= far].max(), abs=1e-9)
    assert result.num_genuine == 30 * 6


def test_tar_at_far_hand_case():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = np.array([True, False, True, True, False, False])
    assert tar_at_far(scores, same, 0.0) == pytest.approx(1 / 3)
    assert tar_at_far(scores, same, 0.34) == pytest.approx(1.0)


def test_identification_accuracy_nearest_neighbour():
    gallery = torch.eye(3)
    probes = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [1.0, 0.0, 0.1]])
    assert identification_accuracy(gallery, torch.tensor([0, 1, 2]), probes, torch.tensor([0, 2, 1])) == \
        pytest.approx(2 / 3)


def test_lfw_pairs_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("10\t300\nAbel_Pacheco\t1\t4\nAbdel_Madi_Shabneh\t1\tDean_Barker\t1\n")
    assert read_lfw_pairs(path) == [("Abel_Pacheco", 1, "Abel_Pacheco", 4),
                                    ("Abdel_Madi_Shabneh", 1, "Dean_Barker", 1)]
    path.write_text("10 300\nAbel_Pacheco 1 x\n")
    with pytest.raises(ValueError, match="line 2"):
        read_lfw_pairs(path)


@pytest.mark.parametrize("head", ["softmax", "arcface"])
def test_recognition_module_shapes(head):
    model = RecognitionModule("resnet18", num_identities=7, head=head, embedding_dim=32)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert model(images).shape == (3, 7)
        assert model.embed(images).shape == (3, 512 if head == "softmax" else 32)


def test_recognition_bad_options_are_named():
    with pytest.raises(ValueError, match="model.head"):
        RecognitionModule("resnet18", num_identities=4, head="cosface")
    with pytest.raises(ValueError, match="model.num_identities"):
        RecognitionModule("resnet18", num_identities=1)
