"""What both trainings share: the learning rate of each step, the seed of each epoch, the resume
state written after every epoch and the file to continue from, the stop on a non-finite loss.

A resumed run repeats an uninterrupted one exactly without storing a scheduler or any RNG state:
the learning rate follows from the global step alone, and every random draw of an epoch from
(seed, epoch, rank) alone.
"""
import json
import os

import torch

from tool.core.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from tool.core.distributed import get_rank, get_world_size
from tool.core.errors import InputError, TrainingFailed
from tool.core.log import log
from tool.core.runtime import seed_everything

# ---- learning rate -----------------------------------------------------------------------------

def poly_lr(base_lr, step, max_step, power=0.9):
    return base_lr * (1 - step / max_step) ** power


def set_learning_rate(optimizer, lr, scales):
    """Set each parameter group's learning rate to `lr` x its scale (`scales`, one per group in
    order), before every step.

    Stage 2's reference (LR_Scheduler) computes exactly this. Stage 1's (PolyOptimizer) scales the
    groups' initial rates by the schedule, (lr x scale) x factor: for its 10x and 20x groups the
    float64 rate can differ in the last place (measured: 30 % of 648,800 rates at lr 0.001-0.02
    over 100-60,000 steps), and SGD rounds the rate to the float32 of the weights, where none of
    them differs, so the training is the same."""
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        group['lr'] = lr * scale


# ---- random draws ------------------------------------------------------------------------------

def seed_epoch(seed, epoch):
    """Seed every RNG for `epoch` (augmentation, dropout, DataLoader worker seeds) from (seed,
    epoch, rank) alone, so the epoch draws the same whether or not the run was resumed before it,
    and each process of a torchrun draws its own."""
    seed_everything(seed + epoch * get_world_size() + get_rank())


# ---- resuming ----------------------------------------------------------------------------------

def plain_args(args):
    """The arguments as JSON-able values, so that checkpoints load with weights_only=True."""
    return json.loads(json.dumps(vars(args), default=str))


def save_resume_state(path, model, optimizer, scaler, args, progress):
    """Everything needed to continue after an epoch exactly as an uninterrupted run would: model,
    optimizer (momentum buffers), loss scaler, the arguments, and the stage's `progress`, a dict of
    its epoch, global step and what else it carries from epoch to epoch."""
    save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                     'args': plain_args(args), **progress}, path)


def load_resume_state(path, model, optimizer, scaler, progress_keys, file_name):
    """Restore a resume file of the stage that writes it as `file_name` into model, optimizer and
    scaler; returns the saved state, whose `progress_keys` the stage reads itself."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not {'model', 'optimizer', 'scaler', *progress_keys} <= set(state):
        raise InputError(f'{path}: not a resume file of this stage (expected the {file_name} a run writes every '
                         f'epoch)')
    load_state_dict_strict(model, state['model'], path)
    restore_optimizer(optimizer, state['optimizer'], path, '; resume with the arguments of the run that wrote it')
    if state['scaler'] and scaler.is_enabled():
        scaler.load_state_dict(state['scaler'])
    return state


def restore_optimizer(optimizer, state_dict, path, advice=''):
    """Load an optimizer state read from `path` (its momentum buffers); one that does not fit this
    model's parameter groups is one InputError line, followed by `advice`."""
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError) as e:
        raise InputError(f'{path}: its optimizer state does not fit this model ({e}){advice}') from None


def resume_file(choice, latest):
    """The resume file to continue from: `choice` itself, or for 'auto' the run's `latest` state
    when there is one; None starts afresh."""
    if choice != 'auto':
        return choice
    if os.path.isfile(latest):
        return latest
    log.info(f'resume auto: no {latest} yet, starting afresh')
    return None


# ---- stopping ----------------------------------------------------------------------------------

class NonFiniteLoss(TrainingFailed):
    """Training diverged."""


def check_finite(loss, where):
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f'{where}: loss is {loss.item()} (non-finite); training stopped. '
                            'Lower --lr or check the input data')
