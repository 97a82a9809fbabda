"""The overlay of a mask on its image, as the reference draws it (its fuse_mask_and_img:
cv2.addWeighted(colours, 0.3, image, 0.7, 0)): every pixel 0.3 of its class colour and 0.7 of
the image."""
import numpy as np

OVERLAY_COLOUR_WEIGHT = 0.3


def overlay(image, labels, palette, rows=None):
    """uint8 (H, W, 3): palette colours blended over the image (a RowSource), in strips of about
    4 M pixels so the float temporaries stay small (a slide is read again rather than kept)."""
    rows = rows or max(1, 2 ** 22 // image.width)
    colours = np.asarray(palette, np.float32).reshape(-1, 3)
    blended = np.empty((image.height, image.width, 3), np.uint8)
    for y in range(0, image.height, rows):
        rgb = image.read(y, rows).astype(np.float32)
        mixed = OVERLAY_COLOUR_WEIGHT * colours[labels[y:y + rows]] + (1 - OVERLAY_COLOUR_WEIGHT) * rgb
        blended[y:y + rows] = np.clip(np.rint(mixed), 0, 255)
    return blended
