"""Small pieces every training and inference script shares: devices, distributed set-up, seeds,
run records, the metrics log, the poly schedule, non-finite loss detection, RNG state for resume."""
import argparse
import atexit
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from tool.io import InputError, save_text


# ---- devices and processes -------------------------------------------------------------------

def resolve_device(name):
    """'auto' -> cuda when available, else cpu. Asking for cuda without one is an input error."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise InputError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
    return torch.device(name)


def init_distributed_mode(args):
    """Set args.distributed/rank/world_size/gpu from torchrun's environment and join the group.

    Without torchrun (no RANK/WORLD_SIZE) this is a single process and nothing changes. NCCL when
    the device is CUDA, gloo on the CPU; multi-node works through torchrun's rendezvous."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, None
        return
    args.distributed = True
    args.rank = int(os.environ['RANK'])
    args.world_size = int(os.environ['WORLD_SIZE'])
    args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = getattr(args, 'device', 'auto') != 'cpu' and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    else:
        args.device = 'cpu'
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method='env://',
                            world_size=args.world_size, rank=args.rank)
    # Leave the group while the interpreter is still whole: a group still alive at exit lets
    # gloo's worker threads be torn down with it, which aborts the process now and then
    # ("terminate called without an active exception"; measured: 1 run in 12 of the distributed
    # stage-1 test).
    atexit.register(leave_process_group)
    dist.barrier()


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def all_reduce_sum(values, device='cpu'):
    """Sum a list of numbers over all processes (identity in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def mean_across_ranks(tensor):
    """The mean over processes of a tensor each process holds, on its device (itself in one
    process). Per-process batch means of equal-sized batches average to the global batch mean."""
    if not is_dist():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / get_world_size()


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
        if is_main_process():
            print('note: --amp is for CUDA; running in float32 on the CPU')
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


def rng_state():
    """Every RNG a training step draws from, so a resumed run continues the same random stream."""
    # Only tensors and plain containers, so that a resume state loads with weights_only=True.
    version, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': _python_rng_to_tensor(), 'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)),
             'pos': pos, 'has_gauss': has_gauss, 'cached_gaussian': cached}, 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_to_tensor():
    version, internal, gauss_next = random.getstate()
    return {'version': version, 'internal': torch.tensor(internal, dtype=torch.int64), 'gauss_next': gauss_next}


def set_rng_state(state):
    python = state['python']
    random.setstate((python['version'], tuple(python['internal'].tolist()), python['gauss_next']))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def resume_file(choice, latest):
    """The resume file to continue from: `choice` itself, or for 'auto' the run's `latest` state
    when there is one; None starts afresh."""
    if choice != 'auto':
        return choice
    if os.path.isfile(latest):
        return latest
    if is_main_process():
        print(f'resume auto: no {latest} yet, starting afresh')
    return None


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


# ---- training helpers ------------------------------------------------------------------------

def poly_lr(base_lr, step, max_step, power=0.9):
    return base_lr * (1 - step / max_step) ** power


class NonFiniteLoss(InputError):
    """Training diverged. An InputError so that the command line stops with one clear line."""


def check_finite(loss, where):
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f'{where}: loss is {loss.item()} (non-finite); training stopped. '
                            'Lower --lr or check the input data')


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
                raise InputError(f'{folder}: cannot write here ({e.strerror})') from None
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
