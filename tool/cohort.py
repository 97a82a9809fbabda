"""A cohort of whole slides: each segmented once, resumable, shared among torchrun processes,
summed up in one table.

    slides = read_slide_list('cohort.csv')       # or any [(name, path)]
    run_cohort(slides, predictor, settings)

Writes under settings.out:
    slides/<name>/<name>-mask.tiff, <name>.geojson, <name>-overlay.png, <name>.csv (its row)
    cohort.csv      one row per finished slide in slides/, sorted by name

A slide's outputs are made in slides/.<name>.partial/, and the folder is renamed into place when
everything is written: a slide folder is always complete. A rerun skips finished slides (unless
--overwrite), and a killed run redoes only the slide it was in (its partial folder is cleared).

Under torchrun, process r of n takes slides r, r + n, r + 2n, ... of the list (the same list in
every process, finished slides included, so no slide is taken twice). After each slide a process
rewrites cohort.csv from every finished slide's row, under a file lock, so the last to finish
writes the whole table. Nothing waits for the others: one process may take hours longer.
"""
import contextlib
import csv
import fcntl
import io
import os
import shutil

from tool.io import InputError, save_text
from tool.slide_inference import segment_slide, slide_plan
from tool.slide_reader import WholeSlide
from tool.utils import get_rank, get_world_size

TABLE = 'cohort.csv'
SLIDE_LIST_COLUMNS = ('path', 'slide')


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
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
    try:
        os.makedirs(partial)
    except OSError as e:
        raise InputError(f'{folder}: cannot write here ({e.strerror})') from None
    try:
        row = segment_slide(path, name, predictor, settings, partial)
        save_text(table_text([row]), os.path.join(partial, f'{name}.csv'))
        replace_folder(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return row


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
        raise InputError(f'{os.path.dirname(path)}: cannot write here ({e.strerror})') from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
