"""Tissue detection (tool/wsi/tissue.py) on thumbnails with known truth: glass with noise, a colour cast
and shading, dense, pink, pale and faintly stained compartments, white lumens, dust; the
saturation-Otsu recipe it replaced, to show its failure on pale tissue is gone; the Aperio sample
slide's glass."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from tool.wsi.tissue import TISSUE_MPP, detect_tissue, saturation

FIXTURE_SLIDE = Path(__file__).resolve().parent / 'fixtures' / 'cmu_small_region.svs'
GLASS = (240, 237, 244)  # a slight blue cast
# (RGB, texture amplitude per channel, grain): nuclei-dense, eosin stroma, pale necrosis or
# oedematous stroma, a faint haematoxylin
DENSE = (105, 55, 150), (30, 20, 15), 8
STROMA = (225, 140, 185), (15, 25, 15), 5
PALE = (235, 215, 225), (4, 6, 5), 3
FAINT = (226, 221, 233), (4, 5, 4), 3


def textured(rng, shape, colour, texture, grain):
    """colour + blotches (smoothed noise, like cells and fibres) + grain."""
    blotches = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 1.5)
    return (np.float32(colour) + (blotches / blotches.std())[..., None] * np.float32(texture)
            + rng.normal(0, grain, shape + (3,)))


def pale_compartment_slide(seed=0, compartments=(DENSE, PALE, STROMA, FAINT), shares=(0.35, 0.35, 0.3),
                           glass_noise=3.0, shading=3.0, size=(240, 320)):
    """uint8 RGB thumbnail at 8 um per pixel (1.9 x 2.6 mm) and its truth: a tissue blob cut into
    compartments across x (wavy borders; with four, the last two share the last band, top and
    bottom), white lumens in it, dust specks on the glass around it, no pen. The truth: `tissue`
    (lumens left out), `glass` (away from specks) and each compartment."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[:h, :w]
    glass = np.float32(GLASS) + (shading * 2 * (x / w - 0.5))[..., None]
    rgb = glass + rng.normal(0, glass_noise, (h, w, 3))
    blob = ((y - h / 2) / (0.38 * h)) ** 2 + ((x - w / 2) / (0.40 * w)) ** 2 < 1
    blob |= ((y - 0.3 * h) / (0.12 * h)) ** 2 + ((x - 0.15 * w) / (0.12 * w)) ** 2 < 1
    across = (x / w - 0.03) / 0.9 + 0.04 * np.sin(y / 9.0)  # 0..1 over the blob
    edges = np.concatenate([[-np.inf], np.cumsum(shares)[:-1], [np.inf]])
    regions = [blob & (across >= lo) & (across < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    if len(compartments) == len(regions) + 1:
        regions[-1:] = [regions[-1] & (y < h / 2), regions[-1] & (y >= h / 2)]
    for region, (colour, texture, grain) in zip(regions, compartments):
        rgb[region] = textured(rng, (h, w), colour, texture, grain)[region]
    lumens = np.zeros((h, w), bool)
    for _ in range(14):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(2, 9)
        disc = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        if blob[disc].all() and not (lumens & ((y - cy) ** 2 + (x - cx) ** 2 <= (r + 3) ** 2)).any():
            lumens |= disc
    rgb[lumens] = (glass + rng.normal(0, glass_noise, (h, w, 3)))[lumens]
    specks = np.zeros((h, w), bool)
    far = cv2.erode((~blob).astype(np.uint8), np.ones((21, 21), np.uint8)).astype(bool)
    for cy, cx, s in zip(rng.integers(2, h - 5, 12), rng.integers(2, w - 5, 12), rng.integers(1, 4, 12)):
        if far[cy, cx]:
            specks[cy:cy + s, cx:cx + s] = True
    rgb[specks] = (120, 110, 100)  # dust, 8..24 um
    truth = dict(tissue=blob & ~lumens, specks=specks,
                 glass=~blob & ~cv2.dilate(specks.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
    truth.update({f'compartment {i}': region & ~lumens for i, region in enumerate(regions)})
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), truth


def otsu_threshold(values):
    """Otsu's threshold of uint8 values (OpenCV's, as CLAM takes it): the t that splits them into
    <= t and > t with the largest between-class variance."""
    return int(cv2.threshold(values, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0])


def saturation_otsu_tissue(rgb):
    """The recipe tool/wsi/tissue.py used before (CLAM, WSInfer): median-filtered saturation above
    Otsu's threshold, at least 20, then the same closing and holes and specks."""
    return detect_tissue(rgb, TISSUE_MPP, threshold=max(otsu_threshold(cv2.medianBlur(saturation(rgb), 3)), 20))


def lost(mask, where):
    return 1 - mask[where].mean()


def test_otsu_threshold_of_the_old_recipe_maximises_the_between_class_variance():
    values = np.concatenate([np.random.default_rng(0).normal(m, s, n) for m, s, n in ((8, 3, 5000), (90, 25, 2000))])
    values = np.clip(values, 0, 255).astype(np.uint8)

    def between_class_variance(t):  # brute force, straight from the definition
        low, high = values[values <= t].astype(float), values[values > t].astype(float)
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2 if len(low) and len(high) else 0
    assert between_class_variance(otsu_threshold(values)) == max(between_class_variance(t) for t in range(256))


@pytest.mark.parametrize('seed', [0, 1])
def test_tissue_is_found_in_every_compartment_pale_and_faint_ones_too(seed):
    rgb, truth = pale_compartment_slide(seed)
    mask = detect_tissue(rgb, TISSUE_MPP)
    assert lost(mask, truth['tissue']) <= 0.01, lost(mask, truth['tissue'])  # measured 0.002, 0.001
    # dense, pale, stroma, faint: measured 0.000, 0.001, 0.000, 0.017 and 0.000, 0.000, 0.000, 0.005
    # (over seeds 0..9 the faint one loses at most 0.028, the whole 0.004)
    for i in range(4):
        assert lost(mask, truth[f'compartment {i}']) <= 0.05, (i, lost(mask, truth[f'compartment {i}']))
    assert 1 - mask[truth['glass']].mean() >= 0.995  # measured 0.9999
    assert truth['specks'].any() and not mask[truth['specks']].any()


def test_tissue_is_no_longer_lost_on_three_populations_where_saturation_otsu_lost_it():
    """Glass, pale and dense tissue (the issue's slide: 39 % of the tissue called glass): Otsu
    splits pale from dense."""
    rgb, truth = pale_compartment_slide(2, compartments=(DENSE, PALE), shares=(0.5, 0.5))
    old, new = saturation_otsu_tissue(rgb), detect_tissue(rgb, TISSUE_MPP)
    assert lost(old, truth['tissue']) > 0.3 and lost(old, truth['compartment 1']) > 0.9  # measured 0.50, 1.00
    assert lost(new, truth['tissue']) <= 0.05 and lost(new, truth['compartment 1']) <= 0.05  # measured 0.000, 0.001
    assert 1 - new[truth['glass']].mean() >= 0.995 and not new[truth['specks']].any()


@pytest.mark.parametrize('glass', ['noisy', 'shaded', 'white beyond the scan'])
def test_tissue_detection_holds_on_noisy_shaded_and_partly_scanned_glass(glass):
    settings = dict(noisy=dict(glass_noise=6.0), shaded=dict(shading=6.0)).get(glass, {})
    rgb, truth = pale_compartment_slide(3, **settings)
    if glass == 'white beyond the scan':  # OpenSlide's transparent areas, composited over white
        rgb[:, :40] = 255
        truth = {name: where & (np.arange(rgb.shape[1]) >= 40) for name, where in truth.items()}
    mask = detect_tissue(rgb, TISSUE_MPP)
    assert lost(mask, truth['tissue']) <= 0.05, lost(mask, truth['tissue'])  # measured 0.003, 0.001, 0.001
    assert 1 - mask[truth['glass']].mean() >= 0.99 and not mask[truth['specks']].any()  # measured >= 0.9993
    assert not detect_tissue(np.full((60, 60, 3), 255, np.uint8), TISSUE_MPP).any()


def test_the_aperio_sample_slides_glass_stays_background_and_its_tissue_is_found():
    """The Aperio sample (H&E, 1.1 x 1.5 mm): no truth, so glass is what unambiguously looks
    like it: median-filtered brightness >= 238 of 255 and saturation <= 8, 24 um from any pixel that
    does not (its glass measures (245, 243, 243))."""
    pytest.importorskip('openslide', reason='OpenSlide is optional: pip install -r requirements-wsi.txt')
    from tool.wsi.slide_reader import SlideView, WholeSlide
    slide = WholeSlide(str(FIXTURE_SLIDE))
    thumbnail = SlideView(slide, TISSUE_MPP / slide.mpp).read_all()  # as find_tissue reads it
    smooth = cv2.medianBlur(thumbnail, 3)
    looks_like_glass = (smooth.mean(2) >= 238) & (saturation(smooth) <= 8)
    glass = cv2.erode(looks_like_glass.astype(np.uint8), np.ones((7, 7), np.uint8),
                      borderType=cv2.BORDER_REPLICATE).astype(bool)
    assert glass.mean() > 0.4  # half the thumbnail
    old, new = saturation_otsu_tissue(thumbnail), detect_tissue(thumbnail, TISSUE_MPP)
    assert 1 - new[glass].mean() >= 0.99 and 1 - new[looks_like_glass].mean() >= 0.95  # measured 1.000, 0.990
    assert new[old].mean() >= 0.99 and new.mean() > old.mean()  # all the old tissue, and the loose fibres
