"""Contact sheet of a pipeline run: a few test patches, one row each, with their ground truth,
their three pseudo-masks (PM_b4_5, PM_b5_2, PM_bn7) and the stage-2 prediction.

Pseudo-masks are made for the training patches only, and those are the patches stage 2 trained
on; to show the whole chain on unseen patches, the pseudo-masks of the test patches are computed
here by the rule 2_generate_PM.py applies, from their patch-level label (the classes present in
their mask, as a training label lists the classes present). They only go into the picture.
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tool.core.checkpoint import read_state_dict
from tool.core.files import save_png
from tool.core.models import classifier_from_state_dict
from tool.data.datasets import BACKGROUND, DATASETS
from tool.data.patches import TissueDataset, colourise, image_to_rgb, read_mask
from tool.method.gradcam import multi_layer_grad_cam
from tool.method.paper_layers import PAPER_LAYERS
from tool.method.pseudo_mask import background_mask, pseudo_mask, uses_white_background

COLUMNS = ('patch', 'ground truth', 'PM_b4_5', 'PM_b5_2', 'PM_bn7', 'stage 2')
MIN_TILE = 128      # small patches are enlarged (nearest neighbour) to at least this size
TEXT_HEIGHT = 16    # one line of the default font, with a margin
GAP = 2             # white pixels between tiles


def choose_patches(labels, count):
    """Indices of `count` test patches: the first ones in name order that hold two classes or
    more (a one-class patch shows little), then one-class ones if there are too few. Chosen
    without a look at any prediction."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i].sum() < 2, i))
    return order[:count]


def sheet_rows(dataroot, dataset, stage1_weights, prediction_dir, count):
    """[(patch name, [uint8 RGB tile per column])] for the chosen test patches."""
    test = TissueDataset(dataroot, 'test', dataset)
    model = classifier_from_state_dict(read_state_dict(stage1_weights), stage1_weights).eval()
    palette = DATASETS[dataset].palette
    rows = []
    for index in choose_patches(test.labels, count):
        item = test[index]
        rgb = image_to_rgb(item['image'])
        cams = multi_layer_grad_cam(model, item['image'][None], PAPER_LAYERS)
        background = background_mask(rgb) if uses_white_background(dataset) else None
        masks = [pseudo_mask(cams[layer][0].numpy(), item['label'].numpy(), background) for layer in PAPER_LAYERS]
        prediction = read_mask(os.path.join(prediction_dir, os.path.splitext(item['name'])[0] + '.png'))
        truth = item['masks'][0].numpy().astype(np.uint8)
        # Stage 2 predicts the four tissue classes only; glass in the truth is not scored, and is
        # shown as such rather than as whatever class the network gives it.
        prediction = np.where(truth == BACKGROUND, BACKGROUND, prediction).astype(np.uint8)
        rows.append((item['name'], [rgb] + [colourise(m, palette) for m in (truth, *masks, prediction)]))
    return rows


def draw_sheet(rows, dataset):
    """One image: a header of column names, a row of tiles per patch, a colour legend."""
    height, width = rows[0][1][0].shape[:2]
    scale = max(1, -(-MIN_TILE // max(height, width)))  # ceiling division
    tile_h, tile_w = height * scale, width * scale
    sheet_w = len(COLUMNS) * (tile_w + GAP) - GAP
    sheet_h = TEXT_HEIGHT + len(rows) * (tile_h + GAP) + 2 * TEXT_HEIGHT
    sheet = Image.new('RGB', (sheet_w, sheet_h), 'white')
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, title in enumerate(COLUMNS):
        draw.text((c * (tile_w + GAP) + 2, 2), title, fill='black', font=font)
    for r, (_, tiles) in enumerate(rows):
        y = TEXT_HEIGHT + r * (tile_h + GAP)
        for c, tile in enumerate(tiles):
            enlarged = Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST)
            sheet.paste(enlarged, (c * (tile_w + GAP), y))
    y = TEXT_HEIGHT + len(rows) * (tile_h + GAP) + 2
    x = 2
    colours = np.asarray(DATASETS[dataset].palette).reshape(-1, 3)
    for name, colour in zip((*DATASETS[dataset].class_names, 'background'), colours):
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(int(v) for v in colour), outline='black')
        draw.text((x + 14, y), name, fill='black', font=font)
        x += 14 + int(draw.textlength(name, font=font)) + 12
    draw.text((2, y + TEXT_HEIGHT), 'test patches; their pseudo-masks from the patch label (classes in the truth), '
                                    'as for training patches; stage 2 on glass (not scored) in white', fill='black',
              font=font)
    return np.asarray(sheet)


def save_contact_sheet(path, dataroot, dataset, stage1_weights, prediction_dir, count=4, threads=None):
    """Write the contact sheet PNG; returns its size (width, height)."""
    if threads is not None:
        torch.set_num_threads(threads)
    image = draw_sheet(sheet_rows(dataroot, dataset, stage1_weights, prediction_dir, count), dataset)
    save_png(image, path)
    return image.shape[1], image.shape[0]
