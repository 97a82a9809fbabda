"""Segmentation metrics, as the reference scores them (its `iouutils.scores`).

Pixels whose ground truth is background (4) or any value >= n_class are not counted. A prediction
of background (4) on a tissue pixel is counted as wrong: the matrix keeps one extra column for it,
so that pseudo-masks (which do predict 4) are scored the same way as the reference scores them.

    IoU_c   = TP_c / (TP_c + FP_c + FN_c)       NaN when class c is in neither truth nor prediction
    MIoU    = mean of the non-NaN IoU_c
    FwIoU   = sum_c freq_c * IoU_c over classes present in the truth, freq_c = truth pixels of c / counted pixels
    Acc     = correct / counted;  mean class accuracy = mean over classes present in the truth of TP_c / truth_c
    Dice_c  = 2 TP_c / (truth_c + predicted_c)

Matrices from batches or from ranks add up to the matrix of the whole set, so accumulating gives
exactly the numbers of one call.
"""
import json
import math

import numpy as np
import torch


class ConfusionMatrix:
    """Rows: truth 0..n_class-1. Columns: prediction 0..n_class, the last being background."""

    def __init__(self, n_class=4):
        self.n_class = n_class
        self.matrix = np.zeros((n_class, n_class + 1), dtype=np.int64)

    def update(self, truth, pred):
        truth = _as_int64(truth).reshape(-1)
        pred = _as_int64(pred).reshape(-1)
        if truth.shape != pred.shape:
            raise ValueError(f'truth has {truth.size} pixels, prediction {pred.size}')
        counted = (truth >= 0) & (truth < self.n_class)
        pred = pred[counted]
        if pred.size and (pred.min() < 0 or pred.max() > self.n_class):
            raise ValueError(f'prediction values must lie in 0..{self.n_class}')
        index = truth[counted] * (self.n_class + 1) + pred
        self.matrix += np.bincount(index, minlength=self.n_class * (self.n_class + 1)).reshape(self.matrix.shape)
        return self

    def __iadd__(self, other):
        self.matrix += other.matrix
        return self

    def reduce_across_ranks(self):
        """Sum the matrices of all processes (no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.from_numpy(self.matrix).to(_collective_device())
            torch.distributed.all_reduce(t)
            self.matrix = t.cpu().numpy()
        return self

    def scores(self):
        return scores_from_matrix(self.matrix)


def _collective_device():
    return torch.device('cuda', torch.cuda.current_device()) \
        if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')


def _as_int64(a):
    if torch.is_tensor(a):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(np.int64)


def scores_from_matrix(matrix):
    n = matrix.shape[0]
    matrix = matrix.astype(np.float64)
    tp = np.diag(matrix[:, :n])
    truth = matrix.sum(axis=1)
    predicted = matrix[:, :n].sum(axis=0)
    total = matrix.sum()
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = tp / (truth + predicted - tp)
        class_acc = tp / truth
        dice = 2 * tp / (truth + predicted)
        freq = truth / total
    present = truth > 0
    return {
        'iou': iou.tolist(),
        'miou': _nanmean(iou),
        'fwiou': float((freq[present] * iou[present]).sum()) if total else math.nan,
        'acc': float(tp.sum() / total) if total else math.nan,
        'mean_acc': _nanmean(class_acc),
        'dice': dice.tolist(),
        'pixels': int(total),
    }


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def format_table(rows, class_names):
    """A table with one line per named score dict: per-class IoU, MIoU, FwIoU, Acc (4 decimals).

    `rows` is a dict {row name: scores}. NaN prints as 'n/a' (a class absent from truth and prediction)."""
    fmt = lambda v: 'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'
    header = ['', *class_names, 'MIoU', 'FwIoU', 'Acc']
    lines = [[name, *[fmt(v) for v in s['iou']], fmt(s['miou']), fmt(s['fwiou']), fmt(s['acc'])]
             for name, s in rows.items()]
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    render = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = '-' * len(render(header))
    out = [render(header), rule] + [render(r) for r in lines]
    if any(s['pixels'] == 0 for s in rows.values()):
        out.append('n/a: no tissue pixels were counted (every truth pixel was background)')
    return '\n'.join(out)


def scores_to_json(scores, class_names):
    """Scores with per-class values keyed by class name; NaN becomes null so the JSON is standard."""
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    return {
        'miou': clean(scores['miou']), 'fwiou': clean(scores['fwiou']),
        'acc': clean(scores['acc']), 'mean_acc': clean(scores['mean_acc']),
        'iou': {c: clean(v) for c, v in zip(class_names, scores['iou'])},
        'dice': {c: clean(v) for c, v in zip(class_names, scores['dice'])},
        'pixels': scores['pixels'],
    }


def dumps(obj):
    return json.dumps(obj, indent=2, sort_keys=False)
