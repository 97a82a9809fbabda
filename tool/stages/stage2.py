r"""Stage 2: DeepLabV3+ trained on the multi-layer pseudo-masks, validated every epoch, tested
with and without the classification gate.

    python 3_train_stage2.py --dataset luad --dataroot datasets/LUAD-HistoSeg --epochs 30 \
        --resume init_weights/deeplab-resnet.pth.tar \
        --resume_stage1 checkpoints/stage1_checkpoint_trained_on_luad.pth
    torchrun --nproc_per_node 4 3_train_stage2.py ...        # several GPUs (DDP)

Same flags and defaults as the reference, with its bugs fixed: booleans parse 'False' as False,
--resume_stage1 exists, the stage-1 checkpoint is not hard-coded, --eval-interval is honoured.
Outputs in --savepath: stage2_checkpoint_trained_on_<dataset>.pth (best validation MIoU),
stage2_resume.pth (every epoch; --resume_state auto continues), metrics.jsonl (loss per step,
validation scores), test_metrics.json, stage2_run_args.json.
"""
import argparse
import json
import math
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from network.deeplab import BACKBONES, DeepLab
from tool.core import distributed, runtime
from tool.core.checkpoint import load_checkpoint, load_state_dict_strict, read_state_dict, save_checkpoint
from tool.core.errors import InputError
from tool.core.files import save_text
from tool.core.log import log
from tool.core.models import classifier_from_state_dict, deeplab_from_state_dict, init_deeplab_from_file
from tool.data.datasets import DATASETS, N_CLASS
from tool.data.patches import TissueDataset, batch_to_device, png_width_height
from tool.method.gate import GATE_MODES, GATE_THRESHOLD, gate_classes, gated_prediction
from tool.method.losses import pseudo_supervision_loss
from tool.method.metrics import ConfusionMatrix, format_table, scores_to_json
from tool.method.paper_layers import LOSS_ORDER, loss_weights, pseudo_mask_dirs
from tool.stages import training

PSEUDO_MASK_DIRS = pseudo_mask_dirs()  # in LOSS_ORDER
SUPERVISION = {  # --supervision -> mask folders; the first one decides the background channel
    'multilayer': PSEUDO_MASK_DIRS,
    'bn7': pseudo_mask_dirs(['bn7']),
    'gt': ['train_gt'],  # fully supervised upper bound: pixel ground truth of the train patches
}
LOG_EVERY = 20  # steps between host syncs for the loss log and the non-finite check
LR_SCALES = (1, 10)  # learning rates of the backbone and of the ASPP and decoder: --lr times these
RESUME_FILE = 'stage2_resume.pth'


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='WSSS-Tissue stage 2: DeepLabV3+ on multi-layer pseudo-masks',
                                     add_help=add_help)
    boolean = dict(type=runtime.str2bool, nargs='?', const=True, metavar='BOOL')
    # The reference's flags, with its defaults.
    parser.add_argument('--backbone', default='resnet', choices=BACKBONES,
                        help="'resnet' is the reference's ResNet-101; the others are reduced variants for the CPU")
    parser.add_argument('--out-stride', type=int, default=16, choices=(8, 16))
    parser.add_argument('--Is_GM', default=True, **boolean,
                        help='test also with the classification gate (needs --resume_stage1)')
    parser.add_argument('--dataroot', default='datasets/BCSS-WSSS/')
    parser.add_argument('--dataset', default='bcss', choices=('luad', 'bcss'))
    parser.add_argument('--savepath', default='checkpoints/')
    parser.add_argument('--workers', type=int, default=10, metavar='N')
    parser.add_argument('--sync-bn', default=None, **boolean,
                        help='SyncBatchNorm across GPUs; default: on when training on several GPUs')
    parser.add_argument('--freeze-bn', default=False, **boolean)
    parser.add_argument('--loss-type', default='ce', choices=('ce', 'focal'))
    parser.add_argument('--n_class', type=int, default=N_CLASS)
    parser.add_argument('--epochs', type=int, default=30, metavar='N')
    parser.add_argument('--batch-size', type=int, default=20, metavar='N',
                        help='total over all processes (the reference splits it over GPUs)')
    parser.add_argument('--lr', type=float, default=0.01, metavar='LR', help='backbone; ASPP and decoder get 10x')
    parser.add_argument('--lr-scheduler', default='poly', choices=('poly', 'step', 'cos'))
    parser.add_argument('--momentum', type=float, default=0.9, metavar='M')
    parser.add_argument('--weight-decay', type=float, default=5e-4, metavar='M')
    parser.add_argument('--nesterov', action='store_true')
    parser.add_argument('--no-cuda', action='store_true', help='same as --device cpu')
    parser.add_argument('--gpu-ids', default='0', help='without torchrun: the first id picks the GPU')
    parser.add_argument('--seed', type=int, default=1, metavar='S')
    parser.add_argument('--resume', default='init_weights/deeplab-resnet.pth.tar',
                        help="initial DeepLab weights ('none': random init); with --test_only the stage-2 checkpoint")
    parser.add_argument('--checkname', default='deeplab-resnet', help='accepted; unused (as in the reference)')
    parser.add_argument('--ft', action='store_true',
                        help='fine-tune: also load the optimizer state stored in --resume')
    parser.add_argument('--eval-interval', type=int, default=1, help='validate every N epochs (and after the last)')
    # Ours.
    parser.add_argument('--resume_stage1', default=None, help='stage-1 checkpoint for the classification gate')
    parser.add_argument('--width', type=float, default=1.0,
                        help='channel width of a ResNet backbone, the ASPP and the decoder (1.0 = reference); smaller '
                             'for CPU runs (read from the checkpoint with --test_only)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--amp', action='store_true', help='mixed precision on CUDA (bf16 where supported, else fp16)')
    parser.add_argument('--test_only', action='store_true',
                        help='only test the stage-2 checkpoint --resume (and the gate with --resume_stage1)')
    parser.add_argument('--pm_weights', type=parse_loss_weights, default=loss_weights(),
                        help=f'loss weights of {",".join(f"PM_{layer}" for layer in LOSS_ORDER)} '
                             '(--supervision multilayer)')
    parser.add_argument('--supervision', default='multilayer', choices=tuple(SUPERVISION),
                        help="'bn7': single-layer ablation; 'gt': fully supervised on <dataroot>/train_gt")
    parser.add_argument('--resume_state', default=None, metavar='PATH|auto',
                        help='continue an interrupted run (auto: <savepath>/stage2_resume.pth when present)')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


def parse_loss_weights(text):
    try:
        weights = tuple(float(w) for w in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None
    if len(weights) != len(PSEUDO_MASK_DIRS) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise argparse.ArgumentTypeError(f'expected {len(PSEUDO_MASK_DIRS)} non-negative numbers, got {text!r}')
    return weights


def supervision_weights(args):
    return args.pm_weights if args.supervision == 'multilayer' else (1.0,)


# ---- data --------------------------------------------------------------------------------------

def make_data_loaders(args):
    return make_train_loader(args), make_eval_loader(args, 'val'), make_eval_loader(args, 'test')


def make_train_loader(args):
    mask_dirs = SUPERVISION[args.supervision]
    if not os.path.isdir(args.dataroot):
        raise InputError(f'{args.dataroot}: dataset folder not found (--dataroot)')
    for folder in mask_dirs:
        if not os.path.isdir(os.path.join(args.dataroot, folder)):
            hint = ('run 2_generate_PM.py first' if folder in PSEUDO_MASK_DIRS
                    else '--supervision gt needs the pixel masks of the train patches there')
            raise InputError(f'{os.path.join(args.dataroot, folder)}: folder not found ({hint})')
    # uint8 items: a quarter of the bytes through the workers' shared memory, widened on the device.
    dataset = TissueDataset(args.dataroot, 'train', args.dataset, mask_dirs=mask_dirs, augment='flip_blur',
                            as_uint8=True)
    world = distributed.get_world_size()
    # Every process sees a different part of each epoch; seeded by (seed, epoch) through set_epoch,
    # so the order of an epoch does not depend on what ran before it (exact resume).
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=distributed.get_rank(),
                                                  shuffle=True, seed=args.seed)
    per_process = args.batch_size // world
    # A last batch of a single patch would stop BatchNorm in training (the ASPP pooling branch sees
    # one value per channel): drop it then, keep the partial batch otherwise (as the reference).
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_process, sampler=sampler,
                                         num_workers=runtime.data_workers(args.workers),
                                         pin_memory=args.device != 'cpu', drop_last=len(sampler) % per_process == 1)
    if len(loader) == 0:
        raise InputError(f'{dataset.image_dir}: {len(dataset)} patch(es) are too few for training')
    return loader


def make_eval_loader(args, split):
    dataset = TissueDataset(args.dataroot, split, args.dataset)
    dataset.labels  # reads every mask now: a bad one stops the run before training, not after epoch 0
    # Each process scores its own slice, without the padding of DistributedSampler, so that the
    # summed confusion matrices count every patch exactly once.
    own = list(range(distributed.get_rank(), len(dataset), distributed.get_world_size()))
    return torch.utils.data.DataLoader(dataset, batch_size=max(1, args.batch_size // distributed.get_world_size()),
                                       sampler=own, num_workers=runtime.data_workers(args.workers),
                                       pin_memory=args.device != 'cpu')


# ---- model and optimiser -----------------------------------------------------------------------

def make_model(args, initialise=True):
    """DeepLab initialised from --resume (a DeepLab checkpoint; its classifier is kept only when
    it has --n_class classes) or randomly with --resume none (or initialise=False)."""
    model = DeepLab(args.backbone, args.out_stride, num_classes=args.n_class, sync_bn=args.sync_bn,
                    freeze_bn=args.freeze_bn, width=args.width)
    if initialise and args.resume.lower() != 'none':
        init_deeplab_from_file(model, args.resume)
        log.info(f'initialised from {args.resume}')
    return model


def make_optimizer(model, args):
    """SGD with the reference's two parameter groups (LR_SCALES); train_one_epoch sets their rates
    at every step."""
    groups = [{'params': params, 'lr': args.lr * scale}
              for params, scale in zip((model.get_1x_lr_params(), model.get_10x_lr_params()), LR_SCALES, strict=True)]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)


def load_optimizer_state(optimizer, path):
    """--ft: continue with the optimizer state (momentum buffers) stored beside the weights."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or 'optimizer' not in checkpoint:
        raise InputError(f'{path}: --ft needs a checkpoint with an "optimizer" entry')
    training.restore_optimizer(optimizer, checkpoint['optimizer'], path)


def learning_rate(args, step, max_step):
    """The reference's LR_Scheduler (no warm-up): poly (1 - T/N)^0.9 or cosine, per iteration."""
    if args.lr_scheduler == 'poly':
        return training.poly_lr(args.lr, step, max_step)
    return 0.5 * args.lr * (1 + math.cos(math.pi * step / max_step))


def load_stage1(args):
    """The stage-1 classifier for the gate, or None (no --resume_stage1, or --Is_GM False)."""
    if not args.Is_GM:
        return None
    if args.resume_stage1 is None:
        log.info('note: the classification gate is not tested (give --resume_stage1 <stage-1 checkpoint>)')
        return None
    return classifier_from_state_dict(read_state_dict(args.resume_stage1), path=args.resume_stage1).eval()


# ---- one epoch, evaluation, test ---------------------------------------------------------------

def train_one_epoch(model, optimizer, loader, device, epoch, args, metrics_log, scaler, amp_dtype=None):
    """One pass over the training patches; each step's learning rate follows from its global step."""
    model.train()
    weights = supervision_weights(args)
    max_step = args.epochs * len(loader)
    pending = []  # (step, lr, loss on the device): read back every LOG_EVERY steps, not every step
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not distributed.is_main_process(), dynamic_ncols=True)
    for i, batch in enumerate(bar):
        step = epoch * len(loader) + i
        lr = learning_rate(args, step, max_step)
        training.set_learning_rate(optimizer, lr, LR_SCALES)
        images, masks = batch_to_device(batch, device)
        with runtime.autocast(device, amp_dtype):
            logits = model(images)
        # DDP averages gradients over processes, but the reference divides by the whole batch
        # (DataParallel gathers it on one GPU): divide by the number of processes as well.
        loss = pseudo_supervision_loss(logits, masks, weights, args.loss_type) / distributed.get_world_size()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pending.append((step, lr, loss.detach()))
        if len(pending) == LOG_EVERY or i == len(loader) - 1:
            # The mean over processes of loss / world size is the loss of the global batch, as
            # the reference computes it for a batch of --batch-size.
            losses = distributed.mean_across_ranks(torch.stack([p[2] for p in pending])).cpu()
            for (s, r, _), value in zip(pending, losses):
                training.check_finite(value, f'epoch {epoch} step {s}')
                metrics_log.write({'epoch': epoch, 'step': s, 'lr': r, 'loss': value.item()}, step=s)
            bar.set_postfix(loss=f'{losses[-1].item():.4f}', lr=f'{lr:.2e}')
            pending = []


@torch.no_grad()
def evaluate(model, loader, device, n_class, amp_dtype=None, stage1=None, desc='val'):
    """{mode: ConfusionMatrix summed over all processes}; mode 'no_gate', and with a stage-1
    classifier also 'gate_multiply' and 'gate_mask'."""
    model.eval()
    modes = ['no_gate'] + ([f'gate_{m}' for m in GATE_MODES] if stage1 is not None else [])
    matrices = {mode: ConfusionMatrix(n_class) for mode in modes}
    for batch in tqdm(loader, desc=desc, disable=not distributed.is_main_process(), dynamic_ncols=True):
        images = batch['image'].to(device, non_blocking=True)
        truth = batch['masks'][:, 0]
        with runtime.autocast(device, amp_dtype):
            logits = model(images)
        matrices['no_gate'].update(truth, logits.argmax(1))
        if stage1 is not None:
            present = gate_classes(stage1(images))  # full precision: the 0.1 threshold is sensitive
            for mode in GATE_MODES:
                matrices[f'gate_{mode}'].update(truth, gated_prediction(logits, present, mode))
    return {mode: m.reduce_across_ranks() for mode, m in matrices.items()}


def test(model, stage1, loader, device, args, checkpoint_path, amp_dtype=None):
    """Score the test split in every gate mode, print one table (rows = modes), write
    <savepath>/test_metrics.json. Returns {mode: scores}."""
    if stage1 is not None:
        stage1.to(device)
    matrices = evaluate(model, loader, device, args.n_class, amp_dtype, stage1, desc='test')
    scores = {mode: m.scores() for mode, m in matrices.items()}
    class_names = DATASETS[args.dataset].class_names
    if distributed.is_main_process():
        log.info(f'test ({len(loader.dataset)} patches of {args.dataroot}, checkpoint {checkpoint_path}):')
        log.info(format_table(scores, class_names))
        path = os.path.join(args.savepath, 'test_metrics.json')
        record = {'dataset': args.dataset, 'checkpoint': checkpoint_path, 'stage1_checkpoint': args.resume_stage1
                  if stage1 is not None else None, 'gate_threshold': GATE_THRESHOLD,
                  'modes': {mode: scores_to_json(s, class_names) for mode, s in scores.items()}}
        save_text(json.dumps(record, indent=2) + '\n', path)
        log.info(f'test metrics written to {path}')
    return scores


# ---- checkpoints -------------------------------------------------------------------------------

def training_input(dataset, dataset_name):
    """What inference must feed the model: {'patch_size': [height, width] of the training patches,
    'mpp': um per pixel they were cut at (None where unknown)}. DeepLab's image-level pooling makes
    every pixel's prediction depend on the input's extent, so inference tiles at this size."""
    width, height = png_width_height(os.path.join(dataset.image_dir, dataset.names[0]))
    return {'patch_size': [height, width], 'mpp': DATASETS[dataset_name].mpp}


def best_checkpoint_path(args):
    return os.path.join(args.savepath, f'stage2_checkpoint_trained_on_{args.dataset}.pth')


# ---- the whole run -----------------------------------------------------------------------------

def setup(args):
    """Check the arguments that argparse cannot, join the process group, pick the device."""
    if args.no_cuda:
        args.device = 'cpu'
    if args.n_class != N_CLASS:
        raise InputError(f'--n_class {args.n_class}: the datasets have {N_CLASS} tissue classes (+ background 4)')
    if args.width <= 0 or (args.backbone == 'mobilenet' and args.width != 1):
        raise InputError(f'--width {args.width:g}: must be above 0, and 1 with --backbone mobilenet')
    if args.lr_scheduler == 'step':
        raise InputError('--lr-scheduler step: needs a step size the reference never passes (its LR_Scheduler '
                         'asserts); use poly or cos')
    if args.nesterov and args.momentum <= 0:
        raise InputError('--nesterov needs --momentum > 0')
    if args.epochs < 1 or args.batch_size < 1 or args.eval_interval < 1:
        raise InputError('--epochs, --batch-size and --eval-interval must be at least 1')
    distributed.init_distributed_mode(args)
    device = runtime.resolve_device(args.device)
    if device.type == 'cuda' and not args.distributed and device.index is None:
        try:
            gpu_ids = [int(i) for i in args.gpu_ids.split(',')]
        except ValueError:
            raise InputError(f'--gpu-ids {args.gpu_ids}: expected comma-separated integers') from None
        if len(gpu_ids) > 1:
            log.info(f'note: --gpu-ids {args.gpu_ids}: one process uses GPU {gpu_ids[0]}; for several GPUs run '
                     f'torchrun --nproc_per_node {len(gpu_ids)} 3_train_stage2.py ...')
        device = torch.device('cuda', gpu_ids[0])
    args.device = str(device)
    if args.batch_size % distributed.get_world_size():
        raise InputError(f'--batch-size {args.batch_size}: must divide among {distributed.get_world_size()} processes')
    multi_gpu = args.distributed and device.type == 'cuda' and distributed.get_world_size() > 1
    if args.sync_bn and not multi_gpu:
        log.info('note: --sync-bn only applies to several GPUs under torchrun; using BatchNorm')
    args.sync_bn = multi_gpu if args.sync_bn is None else bool(args.sync_bn and multi_gpu)
    return device, runtime.autocast_dtype(args.amp, device)


def main(args):
    device, amp_dtype = setup(args)
    runtime.seed_everything(args.seed)
    stage1 = load_stage1(args)

    if args.test_only:
        if args.resume.lower() == 'none':
            raise InputError('--test_only needs --resume <stage-2 checkpoint>')
        model = deeplab_from_state_dict(read_state_dict(args.resume), args.out_stride, path=args.resume)
        if model.decoder.last_conv[8].out_channels != args.n_class:
            raise InputError(f'{args.resume}: has {model.decoder.last_conv[8].out_channels} classes, not '
                             f'{args.n_class}: an initialisation file? --test_only needs a trained stage-2 checkpoint')
        model.to(device, memory_format=runtime.configure_cuda_speed(device))
        return test(model, stage1, make_eval_loader(args, 'test'), device, args, args.resume, amp_dtype)

    train_loader, val_loader, test_loader = make_data_loaders(args)
    state_path = training.resume_file(args.resume_state, os.path.join(args.savepath, RESUME_FILE))
    fresh = state_path is None  # otherwise the saved state replaces the initial weights
    # A channels_last model makes cuDNN run every convolution in that layout, whatever the input's.
    model = make_model(args, initialise=fresh).to(device, memory_format=runtime.configure_cuda_speed(device))
    optimizer = make_optimizer(model, args)
    if args.ft and fresh and args.resume.lower() != 'none':
        load_optimizer_state(optimizer, args.resume)
    scaler = runtime.grad_scaler(amp_dtype)
    start_epoch, best_pred = 0, -math.inf
    if state_path is not None:
        # 'epoch' is the number of epochs done (stage 1 stores the last epoch done).
        state = training.load_resume_state(state_path, model, optimizer, scaler, ('epoch', 'step', 'best_pred'),
                                           RESUME_FILE)
        start_epoch, best_pred = state['epoch'], state['best_pred']
        log.info(f'resumed from {state_path}: {start_epoch} epoch(s) done, best val MIoU {best_pred:.4f}')
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                          else None)

    metrics_log = runtime.MetricsLog(os.path.join(args.savepath, 'metrics.jsonl'))
    metrics_log.forget_epochs_from(start_epoch)  # what a killed run logged of the epochs it will redo
    metrics_log.write({'event': 'start', 'resumed_from': state_path, 'start_epoch': start_epoch})
    runtime.write_run_record(args.savepath, args, name='stage2_run_args.json')
    class_names = DATASETS[args.dataset].class_names
    for epoch in range(start_epoch, args.epochs):
        training.seed_epoch(args.seed, epoch)
        train_loader.sampler.set_epoch(epoch)
        train_one_epoch(model, optimizer, train_loader, device, epoch, args, metrics_log, scaler, amp_dtype)
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs:
            scores = evaluate(model_without_ddp, val_loader, device, args.n_class, amp_dtype)['no_gate'].scores()
            metrics_log.write({'epoch': epoch, 'split': 'val', **scores_to_json(scores, class_names)}, step=epoch)
            # NaN (no tissue pixel in val) never counts as an improvement.
            improved = math.isfinite(scores['miou']) and scores['miou'] > best_pred
            if improved:
                best_pred = scores['miou']
            if distributed.is_main_process():
                log.info(format_table({f'val epoch {epoch}': scores}, class_names))
                if improved:
                    save_checkpoint({'state_dict': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'epoch': epoch, 'best_pred': best_pred, 'args': training.plain_args(args),
                                     'input': training_input(train_loader.dataset, args.dataset)},
                                    best_checkpoint_path(args))
                    log.info(f'best val MIoU so far, saved {best_checkpoint_path(args)}')
        if distributed.is_main_process():
            training.save_resume_state(os.path.join(args.savepath, RESUME_FILE), model_without_ddp, optimizer, scaler,
                                       args, {'epoch': epoch + 1, 'step': (epoch + 1) * len(train_loader),
                                              'best_pred': best_pred})

    if args.distributed:
        dist.barrier()  # rank 0 has written the best checkpoint
    best = best_checkpoint_path(args)
    if math.isfinite(best_pred):
        load_state_dict_strict(model_without_ddp, read_state_dict(best), best)
    else:
        log.info('note: no validation MIoU was finite, so there is no best checkpoint: testing the final weights')
        best = 'final weights'
    return test(model_without_ddp, stage1, test_loader, device, args, best, amp_dtype)
