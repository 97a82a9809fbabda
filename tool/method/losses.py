"""The multi-layer pseudo-supervision loss of stage 2 (Han et al. 2022).

The segmentation network predicts the 4 tissue classes only. Pseudo-masks (and ground truth) also
mark background (4, white non-tissue). The reference handles that by appending a fifth logit
channel that is 100 where the *first* mask (PM_bn7) is background and 0 elsewhere: there the
cross-entropy for target 4 is ~0 and its gradient on the tissue logits ~e^-100, so background
pixels contribute nothing to learning, but they still count in the mean over pixels. On tissue
pixels the fifth logit is 0 and takes part in the softmax like a fifth class the target never is.

    loss = sum_k w_k * CE(logits (+) 100 [mask_0 == 4], mask_k) / B

with CE the mean over pixels whose target is not 255, divided once more by the batch size B
(the reference's SegmentationLosses with size_average and batch_average both on). The layers and
weights are 0.6 bn7, 0.2 b5_2, 0.2 b4_5 in the reference.
"""
import torch
import torch.nn.functional as F

from tool.data.datasets import BACKGROUND
from tool.method.paper_layers import loss_weights

IGNORE_INDEX = 255
BACKGROUND_LOGIT = 100.0  # the reference's constant: large enough that background costs nothing


def with_background_channel(logits, background):
    """(B, C, H, W) logits and a (B, H, W) bool background map -> (B, C+1, H, W). Any image size:
    the reference hard-codes 224 x 224 here."""
    extra = BACKGROUND_LOGIT * background.unsqueeze(1).to(logits.dtype)
    return torch.cat([logits, extra], dim=1)


def segmentation_loss(logits, target, loss_type='ce'):
    """The reference's SegmentationLosses(size_average=True, batch_average=True) for one mask.

    'ce': mean cross-entropy over non-ignored pixels, divided by the batch size.
    'focal': the reference applies the focal modulation to that *mean* cross-entropy, not per pixel:
    alpha (1 - e^-ce)^gamma ce with gamma 2, alpha 0.5, then divided by the batch size. Reproduced
    as it is (it is a global loss reweighting, not the focal loss of Lin et al.)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if loss_type == 'focal':
        ce = 0.5 * (1 - torch.exp(-ce)) ** 2 * ce
    elif loss_type != 'ce':
        raise ValueError(f'unknown loss type {loss_type!r} (ce or focal)')
    return ce / logits.shape[0]


def pseudo_supervision_loss(logits, masks, weights=loss_weights(), loss_type='ce'):
    """Weighted sum of `segmentation_loss` over K masks.

    logits: (B, 4, H, W) from the network. masks: (B, K, H, W) int64 with values 0..4 (or 255);
    masks[:, 0] decides where the background channel is on (PM_bn7 in the reference; the ground
    truth when training fully supervised). weights: K numbers. Computed in float32 (autocast may
    hand over bf16/fp16 logits)."""
    if masks.shape[1] != len(weights):
        raise ValueError(f'{masks.shape[1]} masks but {len(weights)} loss weights')
    logits = with_background_channel(logits.float(), masks[:, 0] == BACKGROUND)
    return sum(w * segmentation_loss(logits, masks[:, k], loss_type) for k, w in enumerate(weights))
