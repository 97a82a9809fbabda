"""The classification gate of Han et al. 2022: at test time the stage-1 classifier decides which
tissue classes a patch contains, and the segmentation may only predict those.

    present = gate_classes(stage1_logits)                  # sigmoid > 0.1, (B, C) bool
    prediction = gated_prediction(seg_logits, present, mode)  # (B, H, W)

Two modes:
- 'multiply' (the reference, which produced the published numbers): segmentation logits are
  multiplied by 0/1 and then argmax'ed. Quirk: an absent class gets logit 0, so where every present
  class has a negative logit the absent class wins and the gate *adds* a class it was meant to
  remove.
- 'mask': absent classes get -inf, so only present classes can win (what the paper describes).
  When the classifier finds no class at all, the patch is left ungated: a 4-class prediction is
  needed anyway and masking everything would just pick class 0.
"""
import torch

GATE_THRESHOLD = 0.1  # the reference's threshold on the stage-1 sigmoid probabilities
GATE_MODES = ('multiply', 'mask')


def gate_classes(stage1_logits, threshold=GATE_THRESHOLD):
    """(B, C) classifier logits -> (B, C) bool, True where sigmoid(logit) > threshold."""
    return torch.sigmoid(stage1_logits.float()) > threshold


def gated_logits(seg_logits, present, mode):
    """(B, C, H, W) segmentation logits with the gate applied (float32); their argmax is the gated
    prediction. Inference on large images gates each tile, blends the tiles' softmax probabilities
    (tool/inference/sliding_window.py), then takes the argmax."""
    seg_logits = seg_logits.float()
    keep = present[:, :, None, None]
    if mode == 'multiply':
        return seg_logits * keep
    if mode == 'mask':
        keep = keep | ~present.any(1)[:, None, None, None]
        return seg_logits.masked_fill(~keep, float('-inf'))
    raise ValueError(f'unknown gate mode {mode!r} ({" or ".join(GATE_MODES)})')


def gated_prediction(seg_logits, present, mode):
    """(B, C, H, W) segmentation logits, (B, C) bool present classes -> (B, H, W) int64 argmax."""
    return gated_logits(seg_logits, present, mode).argmax(1)
