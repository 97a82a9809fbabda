"""The pseudo-mask rule of WSSS-Tissue: four Grad-CAMs and a patch label -> a class per pixel.

    1. min-max normalise the (4, H, W) stack jointly: one minimum, one maximum for all classes;
    2. zero the classes that the patch label says are absent;
    3. append a background channel: 1.000001 on white non-tissue (LUAD-HistoSeg), else 0;
    4. argmax over the 5 channels, ties to the lowest index.

The numbers follow the reference exactly, including its dtypes: the normalisation is computed in
the CAMs' precision (float32 there), the channels are then stacked in float64. Consequences kept
on purpose, because they made the published pseudo-masks:
- the background score 1.000001 beats every normalised value (at most 1.0): white always wins;
- a pixel where every channel is 0 (a present class at the global minimum, the other present
  classes absent) becomes class 0, even if class 0 is absent from the label;
- if the four maps are constant (max == min) the normalisation divides 0 by 0; NumPy's argmax
  takes the first NaN, so every pixel, background included, becomes the first present class.
The reference crashes on a label without any class; here such a patch becomes class 0 (and
background), but the dataset reader rejects those labels before they get here.
"""
import cv2
import numpy as np

from tool.data.datasets import DATASETS

# Just above the largest normalised CAM value (1.0), so that white pixels always win the argmax.
BACKGROUND_SCORE = 1.000001
# LUAD-HistoSeg background: grayscale above this is white ...
WHITE_LEVEL = 200
# ... and white regions smaller than this many pixels are kept as tissue (lumen specks, glare).
MIN_BACKGROUND_PIXELS = 50


def uses_white_background(dataset, choice='auto'):
    """Whether white non-tissue becomes background 4: 'auto' = as the dataset's labels make it
    (the registry: luad and custom yes, bcss no, white fat is tissue there), as the reference;
    'white' or 'none' decide it outright."""
    return choice == 'white' or (choice == 'auto' and DATASETS[dataset].white_is_background)


def normalise(cams):
    """Joint min-max over all classes and pixels, in the CAMs' own precision (NaN if constant)."""
    cams = np.asarray(cams)
    low, high = cams.min(), cams.max()
    with np.errstate(divide='ignore', invalid='ignore'):
        return (cams - low) / (high - low)


def pseudo_mask(cams, label, background=None):
    """Class indices np.uint8 (H, W), 0..3 tissue and 4 background.

    cams: (n_class, H, W) Grad-CAMs of every class (before any normalisation); label: (n_class,)
    0/1 patch label; background: bool (H, W) white mask (background_mask) or None (BCSS-WSSS: white
    fat is tissue there, so no background channel is used)."""
    normalised = normalise(cams)
    present = np.asarray(label) == 1
    scores = np.zeros((len(normalised) + 1,) + normalised.shape[1:])  # float64, as the reference's np.zeros
    scores[:-1][present] = normalised[present]
    if background is not None:
        scores[-1][background] = BACKGROUND_SCORE
    return scores.argmax(axis=0).astype(np.uint8)


def background_mask(rgb):
    """White non-tissue of a LUAD-HistoSeg patch: bool (H, W).

    The reference thresholds OpenCV's grayscale (> 200) and drops white components smaller than
    50 pixels with scikit-image's remove_small_objects(connectivity=1), i.e. 4-connected."""
    white = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) > WHITE_LEVEL
    return without_small_regions(white, MIN_BACKGROUND_PIXELS)


def without_small_regions(mask, min_pixels, keep_border=False):
    """bool `mask` without its 4-connected regions of fewer than `min_pixels` pixels (with
    keep_border, regions that touch the border stay: the glass around a slide's tissue is no hole)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < min_pixels
    small[0] = False  # label 0 is the rest of the image
    if keep_border:
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return mask & ~small[labels]
