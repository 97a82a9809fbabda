"""Reading and writing checkpoints safely.

A checkpoint never runs code: everything is read with `torch.load(..., weights_only=True)`.
Old DeepLab initialisation files keep `epoch`/`best_pred` as numpy scalars; exactly those numpy
types are allowed, nothing else.
"""
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch

from tool.core.errors import InputError
from tool.core.files import save_torch

# numpy scalars as pickled by numpy 1.x and 2.x: the reconstructor and the dtype objects it needs.
_NUMPY_SCALAR_GLOBALS = [
    (np._core.multiarray.scalar, 'numpy.core.multiarray.scalar'),
    (np._core.multiarray.scalar, 'numpy._core.multiarray.scalar'),
    np.dtype,
] + [type(np.dtype(t)) for t in ('f2', 'f4', 'f8', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', '?')]


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True; every failure becomes one InputError line naming `path`."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: checkpoint not found')
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS), warnings.catch_warnings():
            # torch warns about a pickle protocol above 2 before refusing or reading the file:
            # the refusal, or nothing, is what the user needs to see.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if _RUNS_CODE.search(reason):
            named = re.search(r'GLOBAL (\S+)', reason)
            raise InputError(f'{path}: refused, the checkpoint contains objects that would run code when loaded '
                             f'({_unsafe_globals(path) or (named.group(1) if named else reason)}); only tensors, '
                             f'numbers and containers of them are read') from None
        raise InputError(f'{path}: corrupt, or not a PyTorch checkpoint ({reason})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f'{path}: corrupt or truncated checkpoint ({first})') from None


# What torch's weights-only unpickler says when the pickle asks to import or call something:
# unpickled without weights_only, that code would run.
_RUNS_CODE = re.compile(r'GLOBAL|[Gg]lobal|call reduce|new object|Can only build')


def _unpickler_reason(error):
    """The weights-only unpickler's own one-line reason. torch re-raises it wrapped in paragraphs
    of advice (that the user cannot follow here), keeping the original as __context__."""
    original = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _unsafe_globals(path):
    try:
        return ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the name list is only a courtesy in the message
        return ''


def extract_state_dict(obj, path='checkpoint'):
    """The model weights of a bare state_dict or of a dict holding `state_dict` (or `model`),
    with DataParallel/DDP `module.` prefixes removed."""
    if isinstance(obj, dict):
        for key in ('state_dict', 'model'):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise InputError(f'{path}: not a state_dict (expected tensors by name, or a dict with "state_dict")')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}


def read_state_dict(path):
    return extract_state_dict(load_checkpoint(path), path)


def state_dict_diff(expected, actual, limit=8):
    """A short readable diff between two {key: tensor-or-shape} mappings; '' when they agree.

    Missing `num_batches_tracked` entries are tolerated (older PyTorch did not save them)."""
    shape = lambda v: tuple(v.shape) if torch.is_tensor(v) else tuple(v)
    missing = [k for k in expected if k not in actual and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and shape(expected[k]) != shape(actual[k])]
    lines = []
    for title, keys, fmt in (
            ('missing', missing, lambda k: f'{k} {list(shape(expected[k]))}'),
            ('unexpected', unexpected, lambda k: f'{k} {list(shape(actual[k]))}'),
            ('wrong shape', wrong, lambda k: f'{k}: model {list(shape(expected[k]))}, checkpoint {list(shape(actual[k]))}')):
        if keys:
            shown = '; '.join(fmt(k) for k in keys[:limit])
            more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
            lines.append(f'{len(keys)} {title}: {shown}{more}')
    return ' | '.join(lines)


def load_state_dict_strict(model, state_dict, path='checkpoint'):
    """Load with strict key and shape checking; a mismatch is one InputError line with the diff."""
    diff = state_dict_diff(model.state_dict(), state_dict)
    if diff:
        raise InputError(f'{path}: does not match the model: {diff}')
    model.load_state_dict(state_dict, strict=False)  # strict above, but num_batches_tracked may be absent
    return model


def save_checkpoint(obj, path):
    """Atomic torch.save: a crash leaves the previous file intact."""
    save_torch(obj, path)
