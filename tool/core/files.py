"""Crash-safe file writing, and the one error for a folder that cannot be written to.

Every file this project writes goes through `atomic_write`: the content lands under a temporary
name in the same folder and is renamed into place only when complete, so a kill at any moment
leaves either the old file or the new one, never half of one.
"""
import contextlib
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from tool.core.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


def cannot_write(folder, error):
    """The InputError for an OSError met creating `folder` or a file in it (no permission, a file
    in the way, a full disk): `<folder>: cannot write here (<reason>)`."""
    return InputError(f'{folder}: cannot write here ({error.strerror})')


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    except OSError as e:
        raise cannot_write(folder, e) from None
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
