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
import numpy as np
from scipy import ndimage

BACKGROUND = 4
# Just above the largest normalised CAM value (1.0), so that white pixels always win the argmax.
BACKGROUND_SCORE = 1.000001
# LUAD-HistoSeg background: grayscale above this is white ...
WHITE_LEVEL = 200
# ... and white regions smaller than this many pixels are kept as tissue (lumen specks, glare).
MIN_BACKGROUND_PIXELS = 50


def uses_white_background(dataset, choice='auto'):
    """Whether white non-tissue becomes background 4: 'auto' = yes for luad and custom, no for
    bcss (white fat is tissue there), as the reference; 'white' or 'none' decide it outright."""
    return choice == 'white' or (choice == 'auto' and dataset != 'bcss')


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


def grayscale(rgb):
    """OpenCV's RGB2GRAY of uint8 RGB, bit for bit (OpenCV 3.4 to 5): Rec. 601 weights
    0.299, 0.587, 0.114 in 15-bit fixed point (9798, 19235, 3735), rounded (16384 = one half).
    The often quoted 14-bit weights (4899, 9617, 1868) are OpenCV's YUV ones and differ from
    its gray in about 0.3% of colours."""
    rgb = np.asarray(rgb, dtype=np.int32)
    return ((rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15).astype(np.uint8)


def background_mask(rgb):
    """White non-tissue of a LUAD-HistoSeg patch: bool (H, W).

    The reference thresholds OpenCV's grayscale (> 200) and drops white components smaller than
    50 pixels with scikit-image's remove_small_objects(connectivity=1), i.e. 4-connected; scipy's
    default labelling structure is that same cross."""
    white = grayscale(rgb) > WHITE_LEVEL
    components, _ = ndimage.label(white)
    sizes = np.bincount(components.ravel())
    keep = sizes >= MIN_BACKGROUND_PIXELS
    keep[0] = False  # label 0 is the non-white rest
    return keep[components]
