"""A cohort of whole slides: each segmented once, resumable, shared among torchrun processes,
summed up in one table.

    slides = read_slide_list('cohort.csv')       # or any [(name, path)]
    run_cohort(slides, predictor, settings)

Writes under settings.out:
    slides/<name>/<name>-mask.tiff, <name>.geojson, <name>-overlay.png, <name>.csv (its row)
    cohort.csv      one row per finished slide in slides/, sorted by name

A slide's outputs are made in slides/.<name>.partial/, and the folder is renamed into place when
everything is written: a slide folder is always complete. A rerun skips finished slides (unless
--overwrite), and a killed run continues the slide it was in from its last finished strip of
tiles: the partial folder holds the mask's rows done so far and a progress record (rows, label
counts, tiles) under a fingerprint of everything the mask depends on (the slide and checkpoint
files, the settings but those in MASK_NEUTRAL, the device, the library versions). The mask comes
out byte for byte as an uninterrupted run's (tool/inference/sliding_window.py). Another fingerprint, a bad
slide or --overwrite clears the partial folder: the slide starts from its first tile.

Under torchrun, process r of n takes slides r, r + n, r + 2n, ... of the list (the same list in
every process, finished slides included, so no slide is taken twice). After each slide a process
rewrites cohort.csv from every finished slide's row, under a file lock, so the last to finish
writes the whole table. Nothing waits for the others: one process may take hours longer.
"""
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil

import numpy as np
import torch

from tool.core.distributed import get_rank, get_world_size
from tool.core.errors import InputError
from tool.core.files import cannot_write, save_text
from tool.wsi.label_raster import Progress
from tool.wsi.slide_inference import segment_slide, slide_plan
from tool.wsi.slide_reader import WholeSlide

TABLE = 'cohort.csv'
SLIDE_LIST_COLUMNS = ('path', 'slide')
# Settings that cannot change a mask: left out of its fingerprint, so that a killed run resumed with
# another of them (another --out spelling, more workers, under torchrun or not) goes on. Every other
# setting is in it, a new flag too: by default a different value starts the slide over.
MASK_NEUTRAL = frozenset({'input', 'out', 'masks', 'workers', 'overwrite', 'debug', 'geojson_tolerance',
                          'device', 'distributed', 'rank', 'world_size', 'gpu', 'dist_url'})


def read_slide_list(path):
    """[file] of a CSV list of slides: the column `path` (or `slide`); relative paths are
    relative to the CSV's folder."""
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            column = next((c for c in SLIDE_LIST_COLUMNS if c in (reader.fieldnames or ())), None)
            if column is None:
                raise InputError(f'{path}: a slide list needs a column named {" or ".join(SLIDE_LIST_COLUMNS)} '
                                 f'(found: {", ".join(reader.fieldnames or ()) or "nothing"})')
            files = [row[column].strip() for row in reader if (row[column] or '').strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f'{path}: cannot read the slide list ({e})') from None
    if not files:
        raise InputError(f'{path}: the slide list names no slide')
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, f) for f in files]


def run_cohort(slides, predictor, settings):
    """Segment this process's share of `slides` ([(name, path)]) that is not finished yet."""
    folder = os.path.join(settings.out, 'slides')
    rank, world = get_rank(), get_world_size()
    todo = [(name, path) for name, path in slides if settings.overwrite or not finished(folder, name)]
    for name, path in todo:  # every process checks every slide: a bad one stops all before any work
        check_slide(path, settings)
    mine = [job for job in slides[rank::world] if job in todo]
    who = f'process {rank}/{world}: ' if world > 1 else ''
    # print, not log (the main process's voice only): every process reports the slides it segments
    print(f'{who}{len(slides)} slide(s), {len(slides) - len(todo)} finished earlier (kept; --overwrite redoes '
          f'them), {len(mine)} to segment here -> {folder}')
    for name, path in mine:
        row = segment_slide_atomically(path, name, predictor, settings, folder)
        print(f'{who}{name}: {row["mpp"] or "level " + str(row["level"])} um/px, {row["tiles_run"]} tiles run '
              f'({row["tiles_per_second"]} tiles/s), {row["tiles_skipped"]} skipped without tissue, '
              f'tissue {row["tissue_mm2"] or "?"} mm2, {row["seconds"]} s')
        write_table(settings.out)
    write_table(settings.out)


def finished(folder, name):
    return os.path.isfile(os.path.join(folder, name, f'{name}.csv'))


def check_slide(path, settings):
    """The header checks: OpenSlide opens it, the grid to segment on exists."""
    with WholeSlide(path) as slide:
        slide_plan(slide, settings)


def segment_slide_atomically(path, name, predictor, settings, folder):
    partial = os.path.join(folder, f'.{name}.partial')
    final = os.path.join(folder, name)
    fingerprint = mask_fingerprint(path, settings, predictor)
    if settings.overwrite or Progress(partial, fingerprint).record is None:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed run with other settings, or nothing to go on
    else:  # going on: only the rows done and their record are kept (not an output or a temporary file half written)
        for entry in set(os.listdir(partial)) - {Progress.RASTER, Progress.RECORD}:
            entry = os.path.join(partial, entry)
            if os.path.isdir(entry):
                shutil.rmtree(entry)
            else:
                os.remove(entry)
    try:
        os.makedirs(partial, exist_ok=True)
    except OSError as e:
        raise cannot_write(folder, e) from None
    try:
        row = segment_slide(path, name, predictor, settings, partial, fingerprint)
        save_text(table_text([row]), os.path.join(partial, f'{name}.csv'))
        replace_folder(partial, final)
    except BaseException as e:
        # kept to go on from (Ctrl-C, out of memory, ...) unless the slide itself is bad or nothing is done
        if isinstance(e, InputError) or Progress(partial, fingerprint).record is None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return row


def mask_fingerprint(path, settings, predictor):
    """A hash of everything a slide's mask depends on: the slide file, the settings but MASK_NEUTRAL
    (a file they name, such as the checkpoint, by its path, size and modification time), the
    predictor's device and precision, the library versions."""
    def identity(value):
        if isinstance(value, str) and os.path.isfile(value):
            status = os.stat(value)
            return {'file': os.path.abspath(value), 'size': status.st_size, 'mtime_ns': status.st_mtime_ns}
        return value
    device = getattr(predictor, 'device', None)
    state = {'slide': identity(path),
             'settings': {k: identity(v) for k, v in sorted(vars(settings).items()) if k not in MASK_NEUTRAL},
             'device': str(device), 'amp_dtype': str(getattr(predictor, 'amp_dtype', None)),
             'gpu': torch.cuda.get_device_name(device) if isinstance(device, torch.device) and device.type == 'cuda'
             else None,
             'versions': {'torch': torch.__version__, 'numpy': np.__version__}}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=repr).encode()).hexdigest()


def replace_folder(new, final):
    """Rename `new` to `final`; an existing `final` (--overwrite) is moved aside first and removed."""
    old = os.path.join(os.path.dirname(final), f'.{os.path.basename(final)}.old')
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def table_text(rows):
    columns = list(dict.fromkeys(column for row in rows for column in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_table(out):
    """cohort.csv from the row of every finished slide, under a lock shared by all processes."""
    folder = os.path.join(out, 'slides')
    with locked(os.path.join(out, f'.{TABLE}.lock')):
        names = sorted(name for name in os.listdir(folder) if not name.startswith('.') and finished(folder, name)) \
            if os.path.isdir(folder) else []
        rows = []
        for name in names:
            with open(os.path.join(folder, name, f'{name}.csv'), newline='') as f:
                rows.extend(csv.DictReader(f))
        save_text(table_text(rows), os.path.join(out, TABLE))


@contextlib.contextmanager
def locked(path):
    try:
        handle = open(path, 'a')
    except OSError as e:
        raise cannot_write(os.path.dirname(path), e) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
