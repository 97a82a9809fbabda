"""What every script shares about the machine and the run: the device, data workers, autocast and
loss scaling, seeds, the run record beside the outputs, the metrics log, boolean flags."""
import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch

from tool.core.distributed import is_main_process
from tool.core.errors import InputError
from tool.core.files import cannot_write, save_text
from tool.core.log import log

# ---- devices -----------------------------------------------------------------------------------

def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Asking for cuda without one is an input error."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise InputError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
    return torch.device(name)


def data_workers(requested):
    """DataLoader worker processes: the requested number, but no more than this process's share of
    the CPU cores (torchrun starts LOCAL_WORLD_SIZE processes per machine). Workers beyond that
    only compete with the training threads and each other. (Augmentations depend on the number
    of workers, as with any DataLoader: a machine with fewer cores may draw other flips.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    share = max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    return min(requested, share)


# ---- CUDA speed ------------------------------------------------------------------------------

def autocast_dtype(amp, device):
    """The autocast dtype for --amp: bfloat16 where the GPU supports it (no loss scaling needed),
    else float16 (the caller then needs a GradScaler); None (float32) without --amp or off CUDA."""
    if not amp:
        return None
    if device.type != 'cuda':
        log.info('note: --amp is for CUDA; running in float32 on the CPU')
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, amp_dtype):
    """The context every forward pass of a network that may run in lower precision goes through:
    autocast to `amp_dtype` on `device`, nothing for None (float32)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def grad_scaler(amp_dtype):
    """Loss scaling for float16 autocast (its gradients would underflow); for any other dtype a
    disabled scaler, whose scale, step and update are the plain backward and optimiser step."""
    return torch.amp.GradScaler('cuda', enabled=amp_dtype == torch.float16)


def configure_cuda_speed(device):
    """On CUDA: let cuDNN pick the fastest convolution for the (fixed) input size, and return
    channels_last, the layout its fastest (tensor-core) convolutions use, for models and inputs.
    Elsewhere nothing changes: NCHW keeps CPU results equal to the reference's."""
    if device.type != 'cuda':
        return torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    return torch.channels_last


# ---- repeatability ---------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions():
    import torchvision
    return {'python': platform.python_version(), 'torch': torch.__version__,
            'torchvision': torchvision.__version__, 'numpy': np.__version__,
            'cuda': torch.version.cuda if torch.cuda.is_available() else None,
            'platform': platform.platform()}


def write_run_record(folder, args, name='run_args.json'):
    """Record the command, arguments and library versions beside a run's outputs (rank 0 only)."""
    if not is_main_process():
        return
    record = {'command': ' '.join(sys.argv), 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
              'args': {k: v for k, v in vars(args).items() if _jsonable(v)}, 'versions': versions()}
    save_text(json.dumps(record, indent=2) + '\n', os.path.join(folder, name))


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ---- logs ------------------------------------------------------------------------------------

class MetricsLog:
    """Append one JSON object per line to a metrics file (rank 0 only); TensorBoard too when installed."""

    def __init__(self, path):
        self.path = path if is_main_process() else None
        self.tb = None
        if self.path:
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise cannot_write(folder, e) from None
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(os.path.dirname(os.path.abspath(path)), 'tensorboard'))
            except ImportError:
                pass

    def forget_epochs_from(self, epoch):
        """A run killed mid-epoch logged steps that the resumed run does again: drop the records of
        `epoch` and later, and a last line cut short by the kill, so the log reads as one run."""
        if not self.path or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if _logged_epoch(line) < epoch]
        save_text(''.join(kept), self.path)

    def write(self, record, step=None):
        if not self.path:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)


def _logged_epoch(line):
    """The epoch of a metrics line (-1 for records of no epoch); infinity for a broken line."""
    try:
        return json.loads(line).get('epoch', -1)
    except (json.JSONDecodeError, AttributeError):
        return float('inf')


def str2bool(value):
    """argparse type for booleans: True/False/1/0/yes/no (the reference read '--Is_GM False' as True)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ('true', '1', 'yes', 'y', 't', 'on'):
        return True
    if v in ('false', '0', 'no', 'n', 'f', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (True/False/1/0/yes/no), got {value!r}')
