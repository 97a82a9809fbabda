"""Progressive dropout attention (PDA), the stage-1 contribution of Han et al. 2022.

Each class's CAM loses its most activated pixels (those above gamma times its peak), the remaining
CAMs are averaged over the classes, and the features are re-weighted by that map before pooling.
The classifier is thereby pushed to find evidence beyond the most discriminative region; gamma
shrinks epoch by epoch, dropping more and more of the peak.
"""
import torch
import torch.nn.functional as F


def progressive_dropout_attention(features, fc8_weight, gamma):
    """features (B, K, h, w), fc8_weight (C, K, 1, 1) -> features re-weighted, (B, K, h, w).

    Matches WSSS-Tissue's Attention_Module:
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
    return features * attention


def next_gamma(gamma):
    """The PDA threshold for the next epoch: shrinks by 2 % per epoch while above 0.65."""
    return gamma * 0.98 if gamma > 0.65 else gamma
