"""Segmenting an image larger than a network input: overlapping tiles, blended, strip by strip.

The image is covered by tiles of `tile` x `tile` pixels overlapping by at least `overlap`. Each
tile's class probabilities are weighted by a window that falls off linearly towards the tile's
edges (there the network saw the least context, and seams would show), summed, and divided by the
summed weights. Probabilities are blended rather than logits: they are on one scale in every
tile, and a class the classification gate removed from a tile (logit -inf) simply gets 0 there.

Memory stays O(width x tile x classes) whatever the height: tiles are taken one row of tiles at a
time, and the accumulators span only the `tile` rows the current row of tiles covers. Rows above
the next row of tiles can receive nothing more; they are finished, handed out, and dropped.

    for y, probs in blended_rows(image, predict_logits, tile=224, overlap=32):
        labels[y:y + probs.shape[1]] = probs.argmax(0)       # probs: (C, rows, width)
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def tile_starts(size, tile, overlap):
    """Start offsets of tiles of length `tile` (<= size) covering 0..size, neighbours overlapping by
    at least `overlap`: the fewest tiles that do, spread evenly, first at 0 and last at size - tile."""
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_window(height, width, overlap):
    """(height, width) float32 weights: 1 inside, a linear ramp over `overlap` pixels at every edge.
    Never 0, so a pixel that only one tile covers (the image border) keeps that tile's value."""
    def ramp(n):
        distance_to_edge = torch.minimum(torch.arange(n), torch.arange(n).flip(0)) + 1
        return (distance_to_edge / (overlap + 1)).clamp(max=1).float()
    return ramp(height)[:, None] * ramp(width)[None, :]


def blended_rows(image, predict_logits, tile, overlap, batch_size=16):
    """Yield (y, probs): blended class probabilities (C, rows, width) of image rows y .. y + rows,
    top to bottom, each row exactly once.

    image: has .height, .width and .read(y, rows) -> uint8 (rows, width, 3).
    predict_logits: uint8 (B, h, w, 3) -> logits (B, C, h, w) (any device; accumulation happens there).
    Tiles of one row of tiles are batched `batch_size` at a time; the next strip of the image is
    read in a background thread while the current one is predicted (slides are read from disk)."""
    tile_h, tile_w = min(tile, image.height), min(tile, image.width)
    ys = tile_starts(image.height, tile_h, overlap)
    xs = tile_starts(image.width, tile_w, overlap)
    summed = weights = window = None
    top = 0  # the image row that row 0 of the accumulators holds
    with ThreadPoolExecutor(max_workers=1) as reader:
        next_strip = reader.submit(image.read, ys[0], tile_h)
        for i, y in enumerate(ys):
            strip = next_strip.result()
            if i + 1 < len(ys):
                next_strip = reader.submit(image.read, ys[i + 1], tile_h)
            if y > top:  # rows top .. y are covered by no later tile: finished
                done = y - top
                yield top, summed[:, :done] / weights[:, :done]
                shift_up(summed, done)
                shift_up(weights, done)
                top = y
            for b in range(0, len(xs), batch_size):
                batch_xs = xs[b:b + batch_size]
                tiles = np.stack([strip[:, x:x + tile_w] for x in batch_xs])
                probs = predict_logits(tiles).float().softmax(1)
                if summed is None:
                    summed = probs.new_zeros((probs.shape[1], tile_h, image.width))
                    weights = probs.new_zeros((1, tile_h, image.width))
                    window = blend_window(tile_h, tile_w, overlap).to(probs.device)
                for x, p in zip(batch_xs, probs):
                    summed[:, :, x:x + tile_w] += p * window
                    weights[:, :, x:x + tile_w] += window
    yield top, summed / weights


def shift_up(accumulator, rows):
    """In place: drop the first `rows` rows (dim 1), move the others up, zero the rows freed.
    Only the kept rows (about `overlap` of them) are copied: no second accumulator is allocated."""
    kept = accumulator[:, rows:].clone()
    accumulator.zero_()
    accumulator[:, :kept.shape[1]] = kept
