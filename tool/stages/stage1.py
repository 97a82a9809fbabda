"""Stage 1: train the ResNet-38 patch classifier with progressive dropout attention (PDA), then
score its class activation maps (CAMs) as a segmentation of the val split (when the dataset has
one: the score a recipe is chosen by) and of the test split.

    python 1_train_stage1.py --dataroot datasets/LUAD-HistoSeg --dataset luad \\
        --weights init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    python 1_train_stage1.py --test_only --weights checkpoints/stage1_checkpoint_trained_on_luad.pth \\
        --dataroot datasets/LUAD-HistoSeg --dataset luad
    torchrun --nproc_per_node=4 1_train_stage1.py ...           # distributed, same flags

Every flag of the reference's 1_train_stage1.py keeps its meaning and default. Writes to
--save_folder: stage1_checkpoint_trained_on_<dataset>.pth (bare state_dict, loadable by the
reference), stage1_resume.pth (every epoch, for --resume), metrics.jsonl (every step),
stage1_val_metrics.json, stage1_test_metrics.json, stage1_args.json.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from network.pda import PDA_MODES, next_gamma
from network.resnet38_cls import CAMClassifier
from tool.core.checkpoint import read_state_dict, save_checkpoint
from tool.core.distributed import (all_reduce_sum, get_rank, get_world_size, init_distributed_mode, is_main_process,
                                   mean_across_ranks)
from tool.core.errors import InputError, TrainingFailed
from tool.core.files import save_text
from tool.core.log import log
from tool.core.models import classifier_from_state_dict, load_classifier_backbone
from tool.core.mxnet_params import resnet38d_state_dict
from tool.core.runtime import (MetricsLog, autocast, autocast_dtype, configure_cuda_speed, data_workers, grad_scaler,
                               resolve_device, seed_everything, write_run_record)
from tool.data.datasets import DATASETS, N_CLASS
from tool.data.patches import TissueDataset, batch_to_device
from tool.method.metrics import ConfusionMatrix, format_table, scores_to_json
from tool.stages.training import (check_finite, load_resume_state, poly_lr, resume_file, save_resume_state, seed_epoch,
                                  set_learning_rate)

PDA_FIRST_EPOCH = 3     # the reference enables PDA when the 0-based epoch is > 2 (--pda_from_epoch)
# A classifier whose logits are the same for every patch of this many consecutive steps (or of a
# whole shorter epoch) has died: with PDA's reference map at 0 no gradient reaches any weight again.
DEAD_STEPS = 20
FROM_SCRATCH_MOMENTUM = 0.9
# The reference's four parameter groups: backbone weights, backbone biases, fc8 weight, fc8 bias;
# their learning rates are --lr times these, and weights alone decay.
LR_SCALES = (1, 2, 10, 20)
DECAYS = (True, False, True, False)
CAM_THRESHOLD = 0.25    # test phase: a class is present when sigmoid(logit) > 0.25
RESUME_FILE = 'stage1_resume.pth'


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description='Stage 1: train the ResNet-38 CAM classifier with PDA, '
                                                 'then score its CAMs on the val and test splits', add_help=add_help)
    # The reference's flags, same meaning and defaults.
    parser.add_argument('--batch_size', default=20, type=int)
    parser.add_argument('--max_epoches', default=20, type=int)
    parser.add_argument('--network', default='network.resnet38_cls', choices=['network.resnet38_cls'],
                        help='the classifier module (the reference has only this one)')
    parser.add_argument('--lr', default=0.01, type=float,
                        help='base lr: backbone weights lr, biases 2 lr, fc8 weight 10 lr, fc8 bias 20 lr')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--wt_dec', default=5e-4, type=float, help='weight decay (weights only, not biases)')
    for flag, default in (('--session_name', 'Stage 1'), ('--env_name', 'PDA'), ('--model_name', 'PDA')):
        parser.add_argument(flag, default=default, help='accepted and ignored: the reference names its visdom '
                                                         'plots with it; we log to metrics.jsonl (and TensorBoard)')
    parser.add_argument('--n_class', default=4, type=int)
    parser.add_argument('--weights', default='init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params',
                        help='initialisation: the ImageNet ResNet-38 (MXNet .params, or converted to .pth by '
                             'tool.core.convert_weights) trains as the reference, with conv1a..b2_2 and every BatchNorm '
                             'frozen; a stage-1 checkpoint is fine-tuned the same way; "none": random '
                             'initialisation, every layer and BatchNorm trained. With --test_only: the checkpoint to test')
    parser.add_argument('--trainroot', default='datasets/BCSS-WSSS/train/', help='the train folder of a dataset')
    parser.add_argument('--testroot', default='datasets/BCSS-WSSS/test/',
                        help='the test (or val) folder of a dataset, holding img/ and mask/')
    parser.add_argument('--save_folder', default='checkpoints/')
    parser.add_argument('--init_gama', default=1, type=float, help='initial PDA threshold gamma')
    parser.add_argument('--dataset', default='bcss', choices=sorted(DATASETS))
    # Ours.
    parser.add_argument('--dataroot', help='dataset folder: sets --trainroot DATAROOT/train, --testroot DATAROOT/test '
                                           'and, when DATAROOT/val exists, --valroot DATAROOT/val')
    parser.add_argument('--valroot', help='the val folder of a dataset: its CAMs are scored too, before the test '
                                          '(stage1_val_metrics.json), the score a recipe is chosen by')
    parser.add_argument('--device', default='auto', help='auto (cuda when available), cpu or cuda')
    parser.add_argument('--width', default=1.0, type=float,
                        help='channel width of ResNet-38 (1.0 = reference); smaller for CPU runs')
    parser.add_argument('--momentum', default=None, type=float,
                        help='SGD momentum; default: with --weights from a file the reference\'s effective value, '
                             'which is --wt_dec (it passes weight decay where SGD expects momentum), with '
                             f'--weights none {FROM_SCRATCH_MOMENTUM} (at 5e-4 a network from scratch barely moves)')
    parser.add_argument('--dropout_scale', default=1.0, type=float,
                        help='multiplies the three channel-dropout rates (b6 0.3, b7 0.5, before fc8 0.5; 1: the '
                             'reference\'s); the reduced configuration halves them for its 1/16 width')
    parser.add_argument('--optimizer', default='sgd', choices=('sgd', 'adam'),
                        help='sgd (the reference\'s) or adam (Adam, the same parameter groups, rates and L2 decay)')
    parser.add_argument('--pda', default='auto', choices=('auto',) + PDA_MODES,
                        help='how the PDA map re-weights the features (network/pda.py): reference (its scale, can '
                             'zero the network), normalised (mean 1 per image, cannot); auto: reference with '
                             '--weights from a file, normalised with --weights none')
    parser.add_argument('--pda_from_epoch', default=PDA_FIRST_EPOCH, type=int, metavar='EPOCH',
                        help=f'the first (0-based) epoch trained with PDA; default {PDA_FIRST_EPOCH}, the reference\'s. '
                             'A classifier from scratch should first learn what the classes look like: the reduced '
                             'configuration starts PDA after 60%% of its training (docs/results.md)')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', help='continue training from a resume file; "auto": SAVE_FOLDER/'
                                         f'{RESUME_FILE} when it exists')
    parser.add_argument('--amp', action='store_true', help='mixed precision on CUDA (bf16 where supported, '
                                                            'else fp16 with loss scaling); ignored on the CPU')
    parser.add_argument('--test_only', action='store_true',
                        help='only score the CAMs of --weights on --valroot (if given) and --testroot')
    parser.add_argument('--print_freq', default=10, type=int,
                        help='read losses back from the device every N steps (each step is still logged)')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


def checkpoint_path(args):
    return os.path.join(args.save_folder, f'stage1_checkpoint_trained_on_{args.dataset}.pth')


# ---- data ------------------------------------------------------------------------------------

def make_data_loaders(args, device):
    """(train loader, {split: scoring loader}): the train loader is None with --test_only; the
    scoring loaders are val (with --valroot) and test, in that order.

    Training batches come from a DistributedSampler (one process: all patches) reshuffled by
    set_epoch, so epoch e draws the same batches whether or not the run was resumed before it."""
    pin_memory, num_workers = device.type == 'cuda', data_workers(args.num_workers)
    roots = [(args.testroot, '--testroot')]
    if args.valroot:
        roots.insert(0, (args.valroot, '--valroot'))
    scoring_loaders = dict(scoring_loader(root, flag, args.dataset, num_workers, pin_memory) for root, flag in roots)
    if args.test_only:
        return None, scoring_loaders
    train_root, _ = dataset_folder(args.trainroot, ('train',), '--trainroot')
    # uint8 items: a quarter of the bytes through the workers' shared memory, widened on the device.
    train_set = TissueDataset(train_root, 'train', args.dataset, augment='flip', as_uint8=True)
    # --batch_size is the global batch (the reference's, split over its GPUs by DataParallel): each
    # process takes its share, so 1 or N processes train on the same batches.
    if args.batch_size % get_world_size():
        raise InputError(f'--batch_size {args.batch_size}: must divide among {get_world_size()} processes')
    per_process = args.batch_size // get_world_size()
    sampler = DistributedSampler(train_set, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                 seed=args.seed)
    if len(sampler) < per_process:
        raise InputError(f'{args.trainroot}: {len(train_set)} patches are fewer than one batch '
                         f'(--batch_size {args.batch_size}); every epoch would be empty')
    train_loader = DataLoader(train_set, batch_size=per_process, sampler=sampler, drop_last=True,
                              num_workers=num_workers, pin_memory=pin_memory)
    return train_loader, scoring_loaders


def scoring_loader(root, flag, dataset, num_workers, pin_memory):
    """(split, loader) of a val or test folder. Its patches are split over the processes without
    padding, so each is scored exactly once; batch size 1 because such patches may differ in size."""
    folder, split = dataset_folder(root, ('test', 'val'), flag)
    patches = TissueDataset(folder, split, dataset)
    patches.labels  # reads every mask now (the scores need them): a bad one stops the run before training
    return split, DataLoader(Subset(patches, range(get_rank(), len(patches), get_world_size())),
                             batch_size=1, num_workers=num_workers, pin_memory=pin_memory)


def dataset_folder(path, splits, flag):
    """The reference names the split folder itself (datasets/X/train/); TissueDataset wants the
    dataset folder and the split name."""
    folder = os.path.normpath(path)
    split = os.path.basename(folder)
    if split not in splits:
        raise InputError(f'{flag} {path}: expected the {" or ".join(splits)} folder of a dataset '
                         f'(or give --dataroot)')
    return os.path.dirname(folder), split


# ---- model and optimiser ---------------------------------------------------------------------

def make_model(args):
    """The classifier for training, and a line saying how it was initialised.

    Weights from a file get the reference's setting (frozen conv1a..b2_2 and BatchNorm), meant for
    ImageNet statistics; from random initialisation nothing may stay frozen."""
    settings = {'gamma': args.init_gama, 'pda_mode': pda_mode(args), 'dropout_scale': args.dropout_scale}
    if from_scratch(args):
        model = CAMClassifier(args.n_class, args.width, frozen=False, **settings)
        return model, 'random initialisation; every layer and BatchNorm trains'
    if not os.path.isfile(args.weights):
        raise InputError(f'{args.weights}: --weights file not found (give --weights none to train from '
                         f'random initialisation)')
    if args.weights.endswith('.params'):
        state_dict, _ = resnet38d_state_dict(args.weights)
    else:
        state_dict = read_state_dict(args.weights)
    if 'conv1a.weight' not in state_dict:
        raise InputError(f'{args.weights}: not ResNet-38 weights (no conv1a.weight)')
    channels = state_dict['conv1a.weight'].shape[0]
    if channels != round(64 * args.width):
        raise InputError(f'{args.weights}: holds a ResNet-38 of width {channels / 64:g}, '
                         f'but --width is {args.width:g}')
    if 'fc8.weight' in state_dict:
        model = classifier_from_state_dict(state_dict, args.weights, frozen=True, **settings)
        if model.fc8.weight.shape[0] != args.n_class:
            raise InputError(f'{args.weights}: a classifier of {model.fc8.weight.shape[0]} classes, '
                             f'but --n_class is {args.n_class}')
        how = 'fine-tuning a stage-1 checkpoint'
    else:
        model = load_classifier_backbone(CAMClassifier(args.n_class, args.width, frozen=True, **settings),
                                         state_dict, args.weights)
        how = 'backbone loaded, fc8 initialised'
    return model, f'{args.weights}: {how}; conv1a..b2_2 and every BatchNorm frozen (as the reference)'


def from_scratch(args):
    return args.weights.lower() == 'none'


def momentum(args):
    """--momentum, or by default the reference's effective momentum when starting from weights in a
    file, and FROM_SCRATCH_MOMENTUM from random initialisation (--weights none)."""
    if args.momentum is not None:
        return args.momentum
    # The reference's PolyOptimizer calls SGD(params, lr, weight_decay): the third positional
    # argument of SGD is momentum, so its effective momentum is --wt_dec (5e-4, practically none).
    # Right for fine-tuning ImageNet weights as the paper did; from scratch nothing would move.
    return FROM_SCRATCH_MOMENTUM if from_scratch(args) else args.wt_dec


def pda_mode(args):
    """--pda, where auto is the reference's map from weights in a file and the normalised map from
    random initialisation, where the reference's can zero every feature for good."""
    if args.pda != 'auto':
        return args.pda
    return 'normalised' if from_scratch(args) else 'reference'


def load_classifier(path):
    """A trained stage-1 classifier; its width and classes come from the checkpoint."""
    return classifier_from_state_dict(read_state_dict(path), path).eval()


def make_optimizer(model, args):
    """SGD (or with --optimizer adam, Adam) with the reference's four parameter groups (LR_SCALES);
    train_one_epoch sets their rates by the poly schedule at every step."""
    groups = [{'params': params, 'lr': args.lr * scale, 'weight_decay': args.wt_dec if decays else 0}
              for params, scale, decays in zip(model.parameter_groups(), LR_SCALES, DECAYS, strict=True)]
    if args.optimizer == 'adam':
        # fused: one kernel for all parameters, 7 times faster a step than the default on the CPU here
        return torch.optim.Adam(groups, lr=args.lr, weight_decay=args.wt_dec, fused=True)
    return torch.optim.SGD(groups, lr=args.lr, momentum=momentum(args), weight_decay=args.wt_dec)


# ---- training --------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, data_loader, device, epoch, step, args, metrics_log, scaler, amp_dtype=None):
    """One pass over the training patches from global step `step`; returns the global step after it.

    Each step's learning rate is the reference's poly decay over max_step = iterations per epoch x
    epochs. Losses stay on the device and are read back every --print_freq steps (one host sync
    for many steps); each step is then logged, and a non-finite loss stops training naming its step."""
    model.train()
    max_step = args.max_epoches * len(data_loader)
    gamma = getattr(model, 'module', model).gamma
    enable_pda = epoch >= args.pda_from_epoch
    pending, epoch_sums = [], np.zeros(4)  # sums of loss, exact match, Jaccard; number of steps
    constant_steps = 0  # consecutive steps whose logits were the same for every patch
    bar = tqdm(data_loader, desc=f'epoch {epoch}', disable=not is_main_process(), dynamic_ncols=True)
    for i, batch in enumerate(bar):
        lr = poly_lr(args.lr, step, max_step)
        set_learning_rate(optimizer, lr, LR_SCALES)
        images, _ = batch_to_device(batch, device)
        labels = batch['label'].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images, enable_pda=enable_pda)
        loss = F.multilabel_soft_margin_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pending.append((step, lr, torch.stack([loss.detach(), *label_set_agreement(logits.detach(), labels),
                                               logit_spread(logits.detach())])))
        step += 1
        if len(pending) == args.print_freq or i + 1 == len(data_loader):
            values = log_steps(pending, epoch, gamma, enable_pda, metrics_log)
            constant_steps = stop_if_dead(values[:, 3], constant_steps, min(DEAD_STEPS, len(data_loader)),
                                          f'epoch {epoch} step {step - 1}', values[-1, 0], enable_pda)
            values = values[:, :3]
            epoch_sums += [*values.sum(axis=0), len(values)]
            bar.set_postfix(loss=f'{values[-1, 0]:.4f}', exact=f'{values[-1, 1]:.2f}', lr=f'{pending[-1][1]:.2e}')
            pending = []
    loss_sum, exact_sum, jaccard_sum, steps = epoch_sums.tolist()  # global-batch values, the same in every process
    metrics_log.write({'epoch': epoch, 'step': step, 'epoch_loss': loss_sum / steps,
                       'epoch_exact_match': exact_sum / steps, 'epoch_jaccard': jaccard_sum / steps,
                       'gamma': gamma, 'pda': enable_pda}, step)
    log.info(f'epoch {epoch}: loss {loss_sum / steps:.4f}, exact match {exact_sum / steps:.4f}, '
             f'Jaccard {jaccard_sum / steps:.4f}, PDA {"on" if enable_pda else "off"} (gamma {gamma:.4f})')
    return step


def label_set_agreement(logits, labels):
    """Batch means of the reference's two training scores: exact match of the predicted label
    set (sigmoid > 0.5) with the true one, and their Jaccard index. Training labels always name
    a class (TissueDataset checks), so the union is never empty."""
    predicted, true = torch.sigmoid(logits.float()) > 0.5, labels > 0.5
    exact = (predicted == true).all(dim=1).float().mean()
    jaccard = ((predicted & true).sum(dim=1) / (predicted | true).sum(dim=1)).mean()
    return exact, jaccard


def logit_spread(logits):
    """The largest difference between two patches' logits of a class: 0 when the classifier answers
    the same whatever the patch (inf for a batch of one patch, which cannot tell)."""
    if len(logits) < 2:
        return torch.tensor(float('inf'), device=logits.device)
    return (logits.float() - logits[:1].float()).abs().max()


class DeadClassifier(TrainingFailed):
    """The classifier's logits no longer depend on the input."""


def stop_if_dead(spreads, constant_steps, limit, where, loss, enable_pda):
    """Count the consecutive steps whose logits did not depend on the patch; at `limit` stop the
    run, saying what happened and what to change. Returns the new count."""
    for spread in spreads:
        constant_steps = constant_steps + 1 if spread < 1e-6 else 0
        if constant_steps >= limit:
            cause = ('PDA\'s reference map was 0 for every patch (every CAM <= 0), which zeroes the features: '
                     'pass --pda normalised, or lower --lr' if enable_pda else 'lower --lr')
            raise DeadClassifier(f'{where}: the classifier has died: its logits have been the same for every '
                                 f'patch for {constant_steps} steps (loss {loss:.4f}; ln 2 = 0.6931 when they are '
                                 f'all 0) and no gradient can change that; training stopped. Likely cause: {cause}')
    return constant_steps


def log_steps(pending, epoch, gamma, enable_pda, metrics_log):
    """Read back [(step, lr, tensor(loss, exact, jaccard, logit spread))], averaged over the
    processes (the global batch's values), stop on a non-finite loss, write one record per step;
    returns the values as an array (steps, 4)."""
    stacked = mean_across_ranks(torch.stack([v for _, _, v in pending]).float()).cpu()
    for (step, lr, _), row in zip(pending, stacked):
        check_finite(row[0], f'epoch {epoch} step {step}')
        loss, exact, jaccard, _ = row.tolist()
        metrics_log.write({'epoch': epoch, 'step': step, 'loss': loss, 'exact_match': exact,
                           'jaccard': jaccard, 'lr': lr, 'gamma': gamma, 'pda': enable_pda}, step)
    return stacked.numpy().astype(np.float64)


# ---- test phase: CAMs as segmentation --------------------------------------------------------

def cam_segmentation(cams, logits, size, threshold=CAM_THRESHOLD):
    """The reference's stage-1 test: classes with sigmoid(logit) > threshold are present; their
    CAMs, upsampled bilinearly to `size`, absent ones zeroed, are min-max normalised over all
    classes and pixels together; prediction = argmax over classes (ties -> lowest index, so a pixel
    where every present CAM is 0 goes to class 0 even when it is absent: reference behaviour).

    Returns (prediction (B, H, W) int64, forced (B,) bool). The reference crashes on a patch where
    no class passes the threshold; we take its most probable class as present (the classifier's
    best guess, and every patch holds some tissue) and flag the patch as forced."""
    probs = torch.sigmoid(logits.float())
    present = probs > threshold
    forced = ~present.any(dim=1)
    present |= forced[:, None] & F.one_hot(probs.argmax(dim=1), probs.shape[1]).bool()
    cams = F.interpolate(cams.float(), size=tuple(size), mode='bilinear', align_corners=False)
    cams = cams * present[:, :, None, None]
    low, high = cams.amin(dim=(1, 2, 3), keepdim=True), cams.amax(dim=(1, 2, 3), keepdim=True)
    prediction = ((cams - low) / (high - low)).argmax(dim=1)
    # All CAMs flat (e.g. zero): the reference divides 0 by 0 and numpy's argmax returns the
    # first NaN, i.e. the first present class everywhere.
    flat = (high == low).flatten()
    prediction[flat] = present[flat].int().argmax(dim=1)[:, None, None]
    return prediction, forced


BASELINES = ('uniform random class', 'most frequent labelled class', 'largest labelled class (oracle)')


def baseline_segmentations(truth, labels, label_frequency, generator):
    """Segmentations made without a model, to read the CAM scores against: a uniformly random
    class per pixel; the patch's labelled class that is most frequent among the test labels, on
    every pixel; and, using the ground-truth pixels, its largest labelled class on every pixel
    (the best any one-class-per-patch guess can do)."""
    n_class = labels.shape[1]
    one_class = lambda classes: classes[:, None, None].expand_as(truth)
    areas = torch.stack([(truth == c).sum(dim=(1, 2)) for c in range(n_class)], dim=1)
    return {
        BASELINES[0]: torch.randint(n_class, truth.shape, generator=generator),
        BASELINES[1]: one_class((labels * label_frequency).argmax(dim=1)),
        BASELINES[2]: one_class(areas.argmax(dim=1)),
    }


@torch.no_grad()
def evaluate(model, data_loader, device, seed=0):
    """Score the CAM segmentation (and the baselines) over a val or test loader, all processes
    together. Returns ({name: ConfusionMatrix}, number of patches, number of forced patches)."""
    model.eval()
    n_class = model.fc8.weight.shape[0]
    dataset = data_loader.dataset.dataset
    label_frequency = torch.from_numpy(dataset.labels.sum(axis=0))
    generator = torch.Generator()
    confusion = {name: ConfusionMatrix(n_class) for name in ('CAM', *BASELINES)}
    patches = forced = 0
    batches = tqdm(data_loader, desc='test', disable=not is_main_process(), dynamic_ncols=True)
    for batch, index in zip(batches, data_loader.dataset.indices):  # batch size 1: one test patch each
        # The random baseline of each patch has its own stream, so the scores do not depend on
        # how the patches are split over processes.
        generator.manual_seed(seed * len(dataset) + index)
        images = batch['image'].to(device, non_blocking=True)
        cams, logits = model.forward_cam(images)
        prediction, was_forced = cam_segmentation(cams, logits, images.shape[2:])
        truth = batch['masks'][:, 0]
        confusion['CAM'].update(truth, prediction)
        for name, guess in baseline_segmentations(truth, batch['label'], label_frequency, generator).items():
            confusion[name].update(truth, guess)
        patches += len(images)
        forced += int(was_forced.sum())
    for matrix in confusion.values():
        matrix.reduce_across_ranks()
    patches, forced = all_reduce_sum([patches, forced], device)
    return confusion, int(patches), int(forced)


def report_scores(split, confusion, patches, forced, checkpoint, args):
    """Print the score table of one split and write stage1_<split>_metrics.json (main process)."""
    if not is_main_process():
        return
    names = DATASETS[args.dataset].class_names
    scores = {name: matrix.scores() for name, matrix in confusion.items()}
    log.info(format_table({f'stage-1 CAM, {split}': scores['CAM'],
                           **{f'baseline: {name}': scores[name] for name in BASELINES}}, names))
    log.info(f'{forced} of {patches} {split} patches had no class with probability > {CAM_THRESHOLD}; '
             f'their most probable class was taken as present')
    report = {'checkpoint': checkpoint, 'split': split, 'root': args.valroot if split == 'val' else args.testroot,
              'patches': patches, 'threshold': CAM_THRESHOLD, 'forced_patches': forced,
              **scores_to_json(scores['CAM'], names),
              'baselines': {name: scores_to_json(scores[name], names) for name in BASELINES}}
    path = os.path.join(args.save_folder, f'stage1_{split}_metrics.json')
    save_text(json.dumps(report, indent=2) + '\n', path)
    log.info(f'{split} metrics: {path}')


def score_cams(model, scoring_loaders, device, checkpoint, args):
    for split, loader in scoring_loaders.items():
        report_scores(split, *evaluate(model, loader, device, args.seed), checkpoint, args)


# ---- main ------------------------------------------------------------------------------------

def main(args):
    if args.dataroot:
        args.trainroot, args.testroot = os.path.join(args.dataroot, 'train'), os.path.join(args.dataroot, 'test')
        if args.valroot is None and os.path.isdir(os.path.join(args.dataroot, 'val')):
            args.valroot = os.path.join(args.dataroot, 'val')
    if args.n_class != N_CLASS:
        raise InputError(f'--n_class {args.n_class}: the datasets have {N_CLASS} classes')
    if not 0 <= args.dropout_scale <= 2:
        raise InputError(f'--dropout_scale {args.dropout_scale:g}: must be between 0 and 2 (the largest rate, 0.5, '
                         f'times it must be a probability)')
    init_distributed_mode(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)  # the initialisation; each epoch is seeded by seed_epoch

    if args.test_only:
        if not os.path.isfile(args.weights):
            raise InputError(f'{args.weights}: --weights file not found (--test_only needs a stage-1 checkpoint)')
        model = load_classifier(args.weights).to(device)
        _, scoring_loaders = make_data_loaders(args, device)
        write_run_record(args.save_folder, args, name='stage1_test_args.json')
        score_cams(model, scoring_loaders, device, args.weights, args)
        return

    model, how = make_model(args)
    steps = 'Adam' if args.optimizer == 'adam' else f'SGD momentum {momentum(args):g}'
    log.info(f'{how}; {steps}, dropout x {args.dropout_scale:g}, PDA map {pda_mode(args)}'
             + (' (the defaults from random initialisation; --momentum and --pda change them)'
                if from_scratch(args) and args.momentum is None and args.pda == 'auto' else ''))
    # A channels_last model makes cuDNN run every convolution in that layout, whatever the input's.
    model.to(device, memory_format=configure_cuda_speed(device))
    train_loader, scoring_loaders = make_data_loaders(args, device)
    amp_dtype = autocast_dtype(args.amp, device)
    # Before SyncBatchNorm: parameter_groups() finds the BatchNorm2d layers, and the conversion
    # keeps their parameter objects, so the optimiser still holds them.
    optimizer = make_optimizer(model, args)
    # SyncBatchNorm needs CUDA (torch 2.14 refuses CPU tensors), and only matters when BN trains.
    if args.distributed and device.type == 'cuda' and not model.frozen:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    scaler = grad_scaler(amp_dtype)

    resume_path = resume_file(args.resume, os.path.join(args.save_folder, RESUME_FILE))
    start_epoch, step = 0, 0
    metrics_path = os.path.join(args.save_folder, 'metrics.jsonl')
    if resume_path:
        # 'epoch' is the last epoch done (stage 2 stores the number of epochs done).
        state = load_resume_state(resume_path, model_without_ddp, optimizer, scaler, ('epoch', 'step', 'gamma'),
                                  RESUME_FILE)
        start_epoch, step, model_without_ddp.gamma = state['epoch'] + 1, state['step'], state['gamma']
        MetricsLog(metrics_path).forget_epochs_from(start_epoch)
        log.info(f'{resume_path}: resuming at epoch {start_epoch} (step {step})')
    elif is_main_process() and os.path.isfile(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log
    write_run_record(args.save_folder, args, name='stage1_args.json')
    metrics_log = MetricsLog(metrics_path)

    for epoch in range(start_epoch, args.max_epoches):
        seed_epoch(args.seed, epoch)
        train_loader.sampler.set_epoch(epoch)
        step = train_one_epoch(model, optimizer, train_loader, device, epoch, step, args, metrics_log, scaler,
                               amp_dtype)
        model_without_ddp.gamma = next_gamma(model_without_ddp.gamma)
        if is_main_process():
            save_resume_state(os.path.join(args.save_folder, RESUME_FILE), model_without_ddp, optimizer, scaler,
                              args, {'epoch': epoch, 'step': step, 'gamma': model_without_ddp.gamma})

    final = checkpoint_path(args)
    if is_main_process():
        save_checkpoint(model_without_ddp.state_dict(), final)
        log.info(f'stage-1 weights: {final}')
    score_cams(model_without_ddp, scoring_loaders, device, final, args)
