"""Segmenting an image larger than a network input: overlapping tiles, blended, strip by strip.

The image is covered by tiles of `tile` x `tile` pixels overlapping by at least `overlap`. Each
tile's class probabilities are weighted by a window that falls off linearly towards the tile's
edges (there the network saw the least context, and seams would show), summed, and divided by the
summed weights. Probabilities are blended rather than logits: they are on one scale in every
tile, and a class the classification gate removed from a tile (logit -inf) simply gets 0 there.

Memory stays O(width x tile x classes) whatever the height: tiles are taken one row of tiles at a
time, and the accumulators span only the `tile` rows the current row of tiles covers. Rows above
the next row of tiles can receive nothing more; they are finished, handed out, and dropped.

Tiles can be skipped (whole slides: tiles without tissue): they are not predicted and add nothing,
a row of tiles that is skipped entirely is not even read, and pixels that no predicted tile
covers come out with probability 0 for every class.

A run can start at any image row (start_row: a slide resumed after a kill): it predicts again only
the rows of tiles that reach below start_row, in the same batches, and yields rows from start_row
on. Those rows' accumulators receive the same values in the same order from zero as in a run from
the top, so the probabilities are the same floats, bit for bit.

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


def tile_grid(height, width, tile, overlap):
    """(tile height, tile width, row starts, column starts) of the tiles covering a height x width
    image (a tile shrinks to an image smaller than it)."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return tile_h, tile_w, tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)


def blend_window(height, width, overlap):
    """(height, width) float32 weights: 1 inside, a linear ramp over `overlap` pixels at every edge.
    Never 0, so a pixel that only one tile covers (the image border) keeps that tile's value."""
    def ramp(n):
        distance_to_edge = torch.minimum(torch.arange(n), torch.arange(n).flip(0)) + 1
        return (distance_to_edge / (overlap + 1)).clamp(max=1).float()
    return ramp(height)[:, None] * ramp(width)[None, :]


def first_tile_row(ys, tile_h, start_row, predicts=None):
    """Index into the row starts `ys` of the first row of tiles a run yielding rows from start_row on
    must predict: the first whose tiles reach below start_row (with an overlap over half a tile,
    several rows of tiles above start_row do), or the nearest row above it that predicts a tile
    (predicts(i) -> bool) if it predicts none, so that the accumulators start as in a run from the
    top (tiles above start_row add nothing below it). len(ys) if start_row is past the image."""
    first = next((i for i, y in enumerate(ys) if y + tile_h > start_row), len(ys))
    if predicts is not None and first < len(ys):
        first = next((i for i in range(first, -1, -1) if predicts(i)), first)
    return first


def resumed_tiles(height, width, tile, overlap, start_row, predicted):
    """How many of the tiles `predicted` ({(y, x)}) lie above the first row of tiles that
    blended_rows(..., start_row=start_row) predicts: the tiles a resumed run does not run again."""
    tile_h, _, ys, _ = tile_grid(height, width, tile, overlap)
    rows = {y for y, _ in predicted}
    first = first_tile_row(ys, tile_h, start_row, lambda i: ys[i] in rows)
    top = ys[first] if first < len(ys) else height
    return sum(y < top for y, _ in predicted)


def blended_rows(image, predict_logits, tile, overlap, batch_size=16, skip=None, start_row=0):
    """Yield (y, probs): blended class probabilities (C, rows, width) of image rows y .. y + rows,
    top to bottom, each row from start_row on exactly once.

    image: has .height, .width and .read(y, rows) -> uint8 (rows, width, 3).
    predict_logits: uint8 (B, h, w, 3) -> logits (B, C, h, w) (any device; accumulation happens there).
    skip: optional (y, x) -> True for a tile (top-left corner y, x) not to predict; asked once per
    tile. The first row of tiles must predict one (it tells the classes and the device).
    Tiles of one row of tiles are batched `batch_size` at a time; the next strip of the image is
    read in a background thread while the current one is predicted (slides are read from disk).
    start_row: rows above it are not yielded and the rows of tiles that add nothing to the rows
    below it are not predicted; the rows yielded are those of a run from row 0, to the bit."""
    tile_h, tile_w, ys, xs = tile_grid(image.height, image.width, tile, overlap)
    predicted_xs = [[x for x in xs if not (skip and skip(y, x))] for y in ys]
    first = first_tile_row(ys, tile_h, start_row, lambda i: bool(predicted_xs[i]))
    if first == len(ys):  # nothing left to yield
        return
    summed = weights = window = None
    top = ys[first]  # the image row that row 0 of the accumulators holds

    def read(i):
        return image.read(ys[i], tile_h) if predicted_xs[i] else None

    def rows_from_start(top, summed, weights):  # the accumulators' rows top.. that are not above start_row
        skipped = max(0, start_row - top)
        if skipped < summed.shape[1]:
            yield top + skipped, finished(summed[:, skipped:], weights[:, skipped:])

    with ThreadPoolExecutor(max_workers=1) as reader:
        next_strip = reader.submit(read, first)
        for i in range(first, len(ys)):
            y = ys[i]
            strip = next_strip.result()
            if i + 1 < len(ys):
                next_strip = reader.submit(read, i + 1)
            if y > top:  # rows top .. y are covered by no later tile: finished
                if summed is None:
                    raise ValueError('blended_rows: the first row of tiles predicts no tile')
                done = y - top
                yield from rows_from_start(top, summed[:, :done], weights[:, :done])
                shift_up(summed, done)
                shift_up(weights, done)
                top = y
            for b in range(0, len(predicted_xs[i]), batch_size):
                batch_xs = predicted_xs[i][b:b + batch_size]
                tiles = np.stack([strip[:, x:x + tile_w] for x in batch_xs])
                probs = predict_logits(tiles).float().softmax(1)
                if summed is None:
                    summed = probs.new_zeros((probs.shape[1], tile_h, image.width))
                    weights = probs.new_zeros((1, tile_h, image.width))
                    window = blend_window(tile_h, tile_w, overlap).to(probs.device)
                for x, p in zip(batch_xs, probs):
                    summed[:, :, x:x + tile_w] += p * window
                    weights[:, :, x:x + tile_w] += window
    if summed is None:
        raise ValueError('blended_rows: the first row of tiles predicts no tile')
    yield from rows_from_start(top, summed, weights)


def finished(summed, weights):
    """Blended probabilities: the weighted sum over the summed weights; 0 where no tile was
    predicted (weight 0). Every real weight is far above `tiny`, so it divides as it is."""
    return summed / weights.clamp(min=torch.finfo(weights.dtype).tiny)


def shift_up(accumulator, rows):
    """In place: drop the first `rows` rows (dim 1), move the others up, zero the rows freed.
    Only the kept rows (about `overlap` of them) are copied: no second accumulator is allocated."""
    kept = accumulator[:, rows:].clone()
    accumulator.zero_()
    accumulator[:, :kept.shape[1]] = kept


def argmax(scores, dim):
    """uint8 numpy class indices. max().indices gives argmax's answer (the first maximum on ties)
    but ~10x faster on the CPU, where argmax over a dimension other than the last is slow."""
    return scores.max(dim).indices.to(torch.uint8).cpu().numpy()
