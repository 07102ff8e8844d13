import numpy as np
import pytest

from analysis.attribute_metrics import AttributeReport


def test_report_from_counts_matches_direct_computation():
    rng = np.random.default_rng(0)
    labels = rng.random((500, 3)) < np.array([0.5, 0.1, 0.8])
    preds = np.where(rng.random((500, 3)) < 0.8, labels, ~labels)
    tp = (preds & labels).sum(0); fp = (preds & ~labels).sum(0)
    tn = (~preds & ~labels).sum(0); fn = (~preds & labels).sum(0)
    report = AttributeReport.from_counts(["A", "B", "C"], tp, fp, tn, fn)
    np.testing.assert_allclose(report.error_rate, (preds != labels).mean(0))
    for j in range(3):
        pos = labels[:, j]
        assert report.error_pos[j] == pytest.approx((~preds[pos, j]).mean())
        assert report.error_neg[j] == pytest.approx(preds[~pos, j].mean())
        assert report.majority_error[j] == pytest.approx(min(pos.mean(), 1 - pos.mean()))
    # rows ordered by increasing imbalance: A (0.5), C (0.8), B (0.1)
    assert [row[0] for row in report.to_table()] == ["A", "C", "B"]
    assert report.to_dict()["mean_error"] == pytest.approx((preds != labels).mean())


def test_attribute_without_labels_is_left_out_of_the_means():
    # attribute 0 never labelled (support 0); attribute 1 only has positives (recall 0.5); attribute 2 balanced
    report = AttributeReport.from_counts(["A", "B", "C"], tp=[0, 2, 3], fp=[0, 0, 1], tn=[0, 0, 3], fn=[0, 2, 1])
    assert np.isnan(report.balanced_accuracy[0]) and np.isnan(report.error_rate[0])
    assert report.balanced_accuracy[1] == pytest.approx(0.5)
    assert report.balanced_accuracy[2] == pytest.approx(0.75)
    assert report.mean_balanced_error == pytest.approx((0.5 + 0.25) / 2)
