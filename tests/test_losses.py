import math

import pytest
import torch

from tool.method.losses import pseudo_supervision_loss, segmentation_loss, with_background_channel


def explicit_ce(logits, target):
    """Mean over non-ignored pixels of -log softmax, by a loop over pixels."""
    total, count = 0.0, 0
    b, _, h, w = logits.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[n, y, x])
                if t == 255:
                    continue
                z = logits[n, :, y, x].double()
                total += (torch.logsumexp(z, 0) - z[t]).item()
                count += 1
    return total / count


def test_background_channel_any_size():
    logits = torch.randn(2, 4, 5, 7)
    background = torch.zeros(2, 5, 7, dtype=torch.bool)
    background[1, 2, 3] = True
    out = with_background_channel(logits, background)
    assert out.shape == (2, 5, 5, 7)
    assert torch.equal(out[:, :4], logits)
    assert out[1, 4, 2, 3] == 100 and out[:, 4].sum() == 100


def test_multilayer_loss_equals_explicit_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, 5) * 3
    masks = torch.randint(0, 5, (3, 3, 6, 5))
    masks[:, 1:][masks[:, 1:] == 4] = 0           # only the bn7 mask decides the background channel ...
    masks[:, 1:][(masks[:, :1] == 4).expand(-1, 2, -1, -1)] = 4  # ... and the others agree with it there
    masks[0, 2, 0, :] = 255                        # ignored pixels
    masks[1, 1, 1, 1] = 4                          # background in b5_2 only: the fifth logit is 0 there
    weights = (0.6, 0.2, 0.2)
    got = pseudo_supervision_loss(logits, masks, weights)

    extended = torch.cat([logits, 100.0 * (masks[:, :1] == 4).float()], 1)
    expected = sum(w * explicit_ce(extended, masks[:, k]) / 3 for k, w in enumerate(weights))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # background pixels cost ~nothing but count in the mean: all-background gives ~0 loss
    only_bg = torch.full((3, 3, 6, 5), 4)
    assert pseudo_supervision_loss(logits, only_bg).item() == pytest.approx(0.0, abs=1e-30)


def test_background_counts_in_denominator_and_batch_divides():
    # one image, 2 pixels: a tissue pixel with uniform logits, where the fifth logit is 0 and so
    # competes too (CE = log 5, as in the reference), and a background pixel (CE ~ 0)
    logits = torch.zeros(1, 4, 1, 2)
    mask = torch.tensor([[[[0, 4]]]])
    assert pseudo_supervision_loss(logits, mask, (1.0,)).item() == pytest.approx(math.log(5) / 2)
    # batch of two identical images: per-pixel mean unchanged, then divided by B = 2
    two = pseudo_supervision_loss(logits.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1), (1.0,))
    assert two.item() == pytest.approx(math.log(5) / 2 / 2)


def test_focal_reproduces_the_reference_on_the_mean_ce():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    ce = explicit_ce(logits, target)
    assert segmentation_loss(logits, target, 'focal').item() == pytest.approx(
        0.5 * (1 - math.exp(-ce)) ** 2 * ce / 2, rel=1e-5)


def test_gradients_ignore_background_pixels():
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    mask = torch.tensor([[[[0, 4], [4, 4]]]])
    pseudo_supervision_loss(logits, mask, (1.0,)).backward()
    assert logits.grad[0, :, 0, 0].abs().sum() > 0
    assert logits.grad[0, :, 0, 1].abs().max() < 1e-30


def test_weights_must_match_masks():
    with pytest.raises(ValueError, match='3 masks but 1'):
        pseudo_supervision_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.long), (1.0,))


def test_half_precision_logits_are_scored_in_float32():
    torch.manual_seed(2)
    logits, masks = torch.randn(2, 4, 3, 3), torch.randint(0, 5, (2, 3, 3, 3))
    assert pseudo_supervision_loss(logits.bfloat16(), masks).dtype == torch.float32
