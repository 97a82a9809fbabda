import math

import numpy as np
import pytest
import torch

from tool.method.metrics import ConfusionMatrix, format_table, scores_from_matrix, scores_to_json


def test_hand_computed_case():
    # truth row-major 2x4 image; 4 = background is not counted
    truth = np.array([[0, 0, 1, 1],
                      [2, 4, 3, 0]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 3, 4]])
    s = ConfusionMatrix(4).update(truth, pred).scores()
    # counted pixels: 7 (one background). class 0: truth 3 px, TP 1 (pixel 0), pred-0 on counted px: 1
    # -> IoU0 = 1 / (3 + 1 - 1) = 1/3; class 1: truth 2, TP 2, predicted 3 -> 2/3; class 2: 1/1; class 3: 1/1
    assert s['iou'] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert s['miou'] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1) / 4)
    assert s['acc'] == pytest.approx(5 / 7)
    assert s['fwiou'] == pytest.approx(3 / 7 * 1 / 3 + 2 / 7 * 2 / 3 + 1 / 7 + 1 / 7)
    assert s['mean_acc'] == pytest.approx((1 / 3 + 1 + 1 + 1) / 4)
    assert s['dice'] == pytest.approx([2 * 1 / (3 + 1), 2 * 2 / (2 + 3), 1.0, 1.0])
    assert s['pixels'] == 7


def test_nan_rules():
    # class 3 in neither truth nor prediction -> NaN IoU, left out of the mean
    truth = np.array([0, 0, 1, 2])
    pred = np.array([0, 0, 1, 1])
    s = ConfusionMatrix(4).update(truth, pred).scores()
    assert math.isnan(s['iou'][3])
    assert s['iou'][:3] == pytest.approx([1.0, 0.5, 0.0])
    assert s['miou'] == pytest.approx(0.5)
    # class predicted but absent from truth: IoU 0 (counts in the mean), no weight in FwIoU
    s = ConfusionMatrix(4).update(np.array([0, 0]), np.array([0, 3])).scores()
    assert s['iou'][3] == 0.0 and s['miou'] == pytest.approx((0.5 + 0) / 2)
    assert s['fwiou'] == pytest.approx(0.5)


def test_empty_set_is_reported_not_silent():
    s = ConfusionMatrix(4).update(np.full((3, 3), 4), np.zeros((3, 3))).scores()
    assert s['pixels'] == 0 and math.isnan(s['miou'])
    table = format_table({'model': s}, ('A', 'B', 'C', 'D'))
    assert 'n/a' in table and 'no tissue pixels' in table
    assert scores_to_json(s, ('A', 'B', 'C', 'D'))['miou'] is None


def test_background_prediction_counts_as_wrong_like_the_reference():
    # reference: lp[lt==4]=4, 5x5 histogram, hist[4,4]=0 -> a predicted 4 on tissue is a miss
    s = ConfusionMatrix(4).update(np.array([0, 0, 1, 4]), np.array([0, 4, 1, 4])).scores()
    assert s['iou'][0] == pytest.approx(0.5) and s['acc'] == pytest.approx(2 / 3)


def reference_scores(truths, preds, n_class=4):
    """The reference's iouutils.scores, restated plainly as the oracle."""
    n = n_class + 1
    hist = np.zeros((n, n))
    for lt, lp in zip(truths, preds):
        lp = lp.copy()
        lp[lt == 4] = 4
        mask = (lt >= 0) & (lt < n)
        hist += np.bincount(n * lt[mask].astype(int) + lp[mask], minlength=n * n).reshape(n, n)
    hist[4, 4] = 0
    iu = np.diag(hist)[:4] / (hist.sum(1) + hist.sum(0) - np.diag(hist))[:4]
    freq = hist.sum(1)[:4] / hist.sum()
    return {'acc': np.diag(hist).sum() / hist.sum(), 'miou': np.nanmean(iu),
            'fwiou': (freq[freq > 0] * iu[freq > 0]).sum(), 'iou': iu,
            'mean_acc': np.nanmean(np.diag(hist)[:4] / hist.sum(1)[:4])}


def test_batches_and_ranks_add_up_and_match_the_reference():
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 5, (16, 16)) for _ in range(6)]
    preds = [rng.integers(0, 4, (16, 16)) for _ in range(6)]
    whole = ConfusionMatrix(4).update(np.stack(truths), np.stack(preds)).scores()
    batched = ConfusionMatrix(4)
    for t, p in zip(truths, preds):
        batched.update(torch.from_numpy(t), torch.from_numpy(p))
    rank0, rank1 = ConfusionMatrix(4), ConfusionMatrix(4)
    for i, (t, p) in enumerate(zip(truths, preds)):
        (rank0 if i % 2 else rank1).update(t, p)
    rank0 += rank1
    ref = reference_scores(truths, preds)
    for s in (batched.scores(), rank0.scores()):
        assert s == whole
    for k in ('acc', 'miou', 'fwiou', 'mean_acc'):
        assert whole[k] == pytest.approx(ref[k], abs=1e-12)
    assert whole['iou'] == pytest.approx(list(ref['iou']))


def test_table_has_class_names_and_four_decimals():
    s = scores_from_matrix(np.array([[3, 1, 0], [0, 4, 0]]))
    table = format_table({'no gate': s, 'gate': s}, ('TE', 'NEC'))
    assert table.splitlines()[0].split() == ['TE', 'NEC', 'MIoU', 'FwIoU', 'Acc']
    assert '0.7500' in table and table.count('gate') == 2


def test_rejects_out_of_range_predictions():
    with pytest.raises(ValueError):
        ConfusionMatrix(4).update(np.array([0]), np.array([7]))
