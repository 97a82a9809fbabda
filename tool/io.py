"""Input errors and crash-safe file writing.

Every file this project writes goes through `atomic_write`: the content lands under a temporary
name in the same folder and is renamed into place only when complete, so a kill at any moment
leaves either the old file or the new one, never half of one.
"""
import contextlib
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image


class InputError(Exception):
    """Bad input from the user: a file or an argument. The message is one line naming the file
    (or flag) and the problem; command lines print it and exit with status 2."""


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    except OSError as e:
        raise InputError(f'{folder}: cannot write here ({e.strerror})') from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def save_text(text, path):
    with atomic_write(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def save_palette_png(mask, palette, path):
    """Write an (H, W) array of class indices as an 8-bit palette PNG.

    `palette` is a flat list of RGB values (3 per class index). It is padded to 256 entries: PIL
    otherwise writes a 4-bit PNG for a short palette and indices of 16 and above are lost."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), 'P')
    palette = list(palette)
    image.putpalette(palette + [0] * (768 - len(palette)))
    with atomic_write(path) as tmp:
        image.save(tmp, format='PNG')


def save_png(rgb, path):
    with atomic_write(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format='PNG')


def run_cli(main, args):
    """Run `main(args)`; turn an InputError into one line on stderr and exit status 2.

    With `args.debug` the traceback is kept."""
    try:
        return main(args)
    except InputError as e:
        if getattr(args, 'debug', False):
            raise
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)


def one_line(error):
    """The message of an InputError. One raised in a DataLoader worker comes back as a new
    InputError('Caught InputError in DataLoader worker process N. Original Traceback ...'): its
    last line, '<module>.InputError: <message>', holds the worker's message."""
    message = str(error)
    if message.startswith('Caught ') and '\nOriginal Traceback' in message:
        message = message.rstrip().splitlines()[-1].split(': ', 1)[-1]
    return message
