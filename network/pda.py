"""Progressive dropout attention (PDA), the stage-1 contribution of Han et al. 2022.

Each class's CAM loses its most activated pixels (those above gamma times its peak), the remaining
CAMs are averaged over the classes, and the features are re-weighted by that map before pooling.
The classifier is thereby pushed to find evidence beyond the most discriminative region; gamma
shrinks epoch by epoch, dropping more and more of the peak.

Two ways to apply the map (PDA_MODES):
- 'reference': features x map, as WSSS-Tissue does. The map carries the CAMs' scale, so the logits
  jump when PDA starts (its own loop on the fixture weights at --lr 0.01: loss 0.64 -> 9.6), and
  where every CAM of an image is <= 0 the map is 0: the features, the logits and every gradient
  vanish, and a run trained from scratch can die for good (loss stuck at ln 2).
- 'normalised': features x map / mean(map), per image; an image whose map is 0 everywhere keeps its
  features (map 1). The same spatial re-weighting, without the change of scale and without a way
  to zero the network. For training from random initialisation.
"""
import torch
import torch.nn.functional as F

PDA_MODES = ('reference', 'normalised')


def progressive_dropout_attention(features, fc8_weight, gamma, mode='reference'):
    """features (B, K, h, w), fc8_weight (C, K, 1, 1) -> features re-weighted, (B, K, h, w).

    Matches WSSS-Tissue's Attention_Module (mode 'reference'):
    - the threshold is strict (`>`): with gamma = 1 nothing is dropped, yet the features are still
      multiplied by the class-mean CAM;
    - nothing is detached: gradients flow through the kept CAM values into the features and into
      fc8, only the threshold (a comparison) carries none;
    - the reference divides the summed CAMs by a literal 4, its number of classes; we divide by
      the number of classes C, identical for both datasets and an average for other class counts.
    """
    cams = F.relu(F.conv2d(features, fc8_weight))
    peak = cams.flatten(2).max(dim=2).values[:, :, None, None]  # per image and class
    kept = torch.where(cams > peak * gamma, torch.zeros_like(cams), cams)
    attention = kept.sum(dim=1, keepdim=True) / cams.shape[1]
    if mode == 'normalised':
        attention = normalise_attention(attention)
    elif mode != 'reference':
        raise ValueError(f'PDA mode {mode!r}: expected one of {PDA_MODES}')
    return features * attention


def normalise_attention(attention):
    """Each image's map divided by its spatial mean; a map that is 0 everywhere becomes 1."""
    mean = attention.mean(dim=(2, 3), keepdim=True)
    empty = mean == 0
    return torch.where(empty, torch.ones_like(attention), attention / torch.where(empty, torch.ones_like(mean), mean))


def next_gamma(gamma):
    """The PDA threshold for the next epoch: shrinks by 2 % per epoch while above 0.65."""
    return gamma * 0.98 if gamma > 0.65 else gamma
