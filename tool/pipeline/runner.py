"""The whole pipeline in one command: stage 1, pseudo-masks, stage 2 with its test, the bn7-only
ablation, predictions, a contact sheet and one summary table (what run_pipeline.sh runs).

    python -m tool.pipeline --dataset luad                # reference run, or the synthetic demo
    python -m tool.pipeline --dataset bcss --seeds 0 1 2  # three seeds: mean and spread
    python -m tool.pipeline --config reduced --dataroot DIR   # the demo's recipe on your data
    python -m tool.pipeline --quick                        # tiny synthetic smoke run (~1 min)

Configurations:
    reference  the released dataset (datasets/LUAD-HistoSeg or datasets/BCSS-WSSS): full-size
               models from the ImageNet / VOC weights in init_weights/ and the reference's
               hyper-parameters (its run_pipeline.sh), on the GPU when there is one;
    reduced    no released dataset: the embedded synthetic one (datasets/SYNTH-LUAD or -BCSS,
               generated when absent) with small patches and small models, chosen on the val
               split to finish within ten minutes on two CPU cores; --dataroot runs the same
               recipe on any dataset in the LUAD-HistoSeg layout;
    quick      a tiny synthetic dataset inside the run folder, for tests.
Default: reference when the released dataset is there, reduced otherwise.

Each stage runs its own script (1_train_stage1.py, 2_generate_PM.py, 3_train_stage2.py,
4_infer.py) as a child process with the same Python, so stages share nothing but files, and
each one's output goes to logs/<stage>.log. What a recipe is chosen by is on the val split, whose
pixel truth every dataset has: the stage-1 CAMs, the pseudo-masks that the same rule makes for
the val patches from the classes in their masks, and stage 2's best validation epoch (the
checkpoint it tests). The test split is scored once, at the end. When the dataset also has pixel
truth for its training patches (train_gt/, the synthetic ones do; a real one does not), the
pseudo-masks and stage 2 are scored against it on the same patches, and a fully-supervised model,
3_train_stage2.py --supervision gt with the same backbone, epochs, learning rate and data, gives
the upper bound the weakly-supervised result is read against: diagnostics, marked so. The CPU configurations also train stage 2 on PM_bn7 alone (--supervision bn7),
the paper's single-layer ablation.

Each stage's wall time and CPU time are measured: on cores shared with other programs the
CPU time says what the stage costs. Stages take one thread each in the CPU configurations, where
the fully-supervised model, then the ablation, train beside the chain, and stage 1 can train
several restarts at once and keep the one whose val pseudo-masks score best (stage1_restarts).

Everything lands in one run folder (default runs/pipeline-<dataset>-<config>-<time>/):
    run_args.json             these arguments, library versions
    data/                     links to the dataset's splits, plus train_PM -> ../pseudo_masks
                              (stage 2 reads <dataroot>/train_PM; the dataset stays untouched)
    stage1/                   classifier checkpoint, metrics.jsonl, stage1_{val,test}_metrics.json
                              (the trainings' resume files are removed once the run succeeded)
    stage1_restarts/          with several stage-1 restarts: the ones not kept, restarts.json
    pseudo_masks/             PM_b4_5/ PM_b5_2/ PM_bn7/, pseudo_mask_metrics.json
    pseudo_masks_val/         the same for the val patches, scored against val/mask
    stage2/                   best checkpoint, metrics.jsonl, test_metrics.json (with the gate)
    ablation_bn7/             the same, trained on PM_bn7 alone
    fully_supervised/         the same for the upper bound (train_gt only)
    test_predictions/         stage-2 masks and overlays of the test patches, metrics.json
    train_predictions/        stage 2 on its own training patches, metrics.json vs train_gt
    contact_sheet.png         a few test patches: image, truth, three pseudo-masks, prediction
    logs/<stage>.log          each stage's output, its command line first
    summary.json, summary.md  the table printed at the end
With several --seeds, each seed's run is a folder seed-<s>/ of this layout, and the run folder's
summary gives every result's mean and spread over the seeds.
"""
import argparse
import glob
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

from PIL import Image

from tool.core.errors import InputError, StopRun
from tool.core.files import save_text
from tool.core.log import log
from tool.core.runtime import write_run_record
from tool.data.datasets import DATASETS
from tool.data.patches import list_pngs
from tool.method.paper_layers import PAPER_LAYERS, loss_weighted
from tool.pipeline.contact_sheet import save_contact_sheet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_FLAGS = ('stage1', 'pseudo_masks', 'stage2', 'infer')  # the scripts a configuration gives flags to
# Written every epoch so that an interrupted training can continue; the pipeline does not
# continue stages, and they are large.
RESUME_FILES = ('stage1/stage1_resume.pth', 'stage2/stage2_resume.pth', 'ablation_bn7/stage2_resume.pth',
                'fully_supervised/stage2_resume.pth')
FREE_CORE = 'free core'
GATES = (('no_gate', 'no gate'), ('gate_multiply', 'gate (multiply, reference)'), ('gate_mask', 'gate (mask)'))

# Per configuration: the synthetic dataset to make (None: a released one is used), the threads of
# each stage process (None: the library's choice), whether the fully-supervised baseline and the
# ablation run beside the weakly-supervised chain instead of after it, whether the bn7-only
# ablation runs, each stage's flags, (optionally) the trainings' length in patches seen
# (`patches_seen`: each epoch flag is derived from the dataset's number of training patches), and
# how many stage-1 trainings run at once, the best on val kept (`stage1_restarts`, default 1;
# FREE_CORE: two when no baseline trains beside stage 1, else one).
CONFIGS = {
    'reference': {
        'synthetic': None,
        'threads': None,
        # On a GPU the stage-2 trainings would compete for its memory.
        'alongside': False,
        'ablation': False,
        'init_weights': ['init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params',
                         'init_weights/deeplab-resnet.pth.tar'],
        'stage1': ['--weights', 'init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params', '--max_epoches', '20',
                   '--batch_size', '20', '--lr', '0.01', '--device', 'auto'],
        'pseudo_masks': ['--device', 'auto'],
        'stage2': ['--backbone', 'resnet', '--resume', 'init_weights/deeplab-resnet.pth.tar', '--epochs', '30',
                   '--batch-size', '20', '--lr', '0.01', '--device', 'auto'],
        'infer': ['--device', 'auto'],
    },
    # Chosen on the validation split (docs/results.md, "Choosing the recipe"; python -m
    # tool.pipeline.choose_recipe): among the candidates that fit the demo's time, the best stage-1
    # pseudo-masks of the val patches, then the best stage-2 validation MIoU. The chain (stage 1,
    # the pseudo-masks, stage 2) runs beside the fully-supervised model, then the bn7 ablation once
    # the pseudo-masks exist; without that model, a second stage-1 restart takes its core.
    'reduced': {
        'synthetic': {'size': 96, 'train': 800, 'val': 60, 'test': 100},
        # One thread per process: these convolutions are too small to share out, and the two
        # cores are better spent running the baseline beside the weakly-supervised chain.
        'threads': 1,
        'alongside': True,
        'ablation': True,
        'init_weights': [],
        # From random initialisation (no ImageNet weights here): every layer and BatchNorm trains,
        # with momentum 0.9 and the normalised PDA map (the defaults of --weights none).
        # Half the reference's channel-dropout rates: they were set for 4096 features; of the 256
        # here each dropped channel takes 16 times the share, so the share dropped from a patch
        # varies 4 times as much (val pseudo-masks 0.888 ± 0.009 against 0.881 ± 0.012 over six
        # seeds; docs/results.md, "Half the dropout").
        'stage1': ['--weights', 'none', '--width', '0.0625', '--batch_size', '8',
                   '--lr', '0.01', '--dropout_scale', '0.5', '--num_workers', '0', '--device', 'cpu'],
        # Grad-CAM as the mean over the patch's eight rotations and mirror images: val
        # pseudo-masks 0.920 ± 0.007 against 0.888 ± 0.009 over six seeds, every seed higher
        # (docs/results.md, "Grad-CAM over the eight symmetries").
        'pseudo_masks': ['--batch_size', '32', '--tta', 'd4', '--num_workers', '0', '--device', 'cpu'],
        'stage2': ['--backbone', 'resnet18', '--width', '0.25', '--resume', 'none',
                   '--batch-size', '8', '--lr', '0.03', '--workers', '0', '--device', 'cpu'],
        'infer': ['--workers', '0', '--device', 'cpu'],
        # Stage 1: 20 epochs of the embedded 800 patches, stage 2: 10. A recipe for small models
        # from scratch is a number of updates, not of epochs: on a held-out dataset of 600 patches
        # the same epochs left stage 2 8.7 points below full supervision and below its own
        # pseudo-masks, the same patches seen 6.4 points below and 8.7 above (docs/results.md, with
        # the recipe before). PDA after 60 % of stage 1: a classifier from scratch must first find
        # the classes before their most discriminative pixels are dropped (from the 4th of 10
        # epochs, as the reference starts, its val CAMs scored 0.11 to 0.17 lower). 20 instead of 10: val
        # pseudo-masks 0.881 ± 0.012 against 0.859 ± 0.045 over six seeds, no seed failing
        # (docs/results.md, "Choosing the recipe").
        'patches_seen': {'stage1': [('--max_epoches', 16000), ('--pda_from_epoch', 9600)],
                         'stage2': [('--epochs', 8000)]},
        # Where no fully-supervised baseline needs the second core (data without train_gt/, as a
        # user's are), a second stage-1 restart trains on it and the one whose val pseudo-masks
        # score better is kept: from scratch a seed can end with CAMs that miss a class. On the
        # demo's data the two restarts gave the same mean val as one, at a third of the spread and
        # 1.2 times the time (docs/results.md, "Two restarts of stage 1").
        'stage1_restarts': FREE_CORE,
    },
    'quick': {
        'synthetic': {'size': 32, 'train': 32, 'val': 8, 'test': 8},
        'threads': 1,
        'alongside': True,
        'ablation': True,
        'init_weights': [],
        'stage1': ['--weights', 'none', '--width', '0.0625', '--max_epoches', '1', '--batch_size', '8',
                   '--lr', '0.01', '--dropout_scale', '0.5', '--num_workers', '0', '--device', 'cpu'],
        'pseudo_masks': ['--batch_size', '16', '--tta', 'd4', '--num_workers', '0', '--device', 'cpu'],
        'stage2': ['--backbone', 'resnet18', '--width', '0.25', '--resume', 'none', '--epochs', '1',
                   '--batch-size', '8', '--lr', '0.01', '--workers', '0', '--device', 'cpu'],
        'infer': ['--workers', '0', '--device', 'cpu'],
        'stage1_restarts': 2,
    },
}


def get_args_parser():
    parser = argparse.ArgumentParser(description='The whole WSSS-Tissue pipeline: stage 1, pseudo-masks, stage 2, '
                                                 'test, summary table')
    parser.add_argument('--dataset', default='luad', choices=[name for name, d in DATASETS.items() if d.released_folder])
    parser.add_argument('--config', choices=tuple(CONFIGS),
                        help='default: reference when datasets/<released dataset> exists, else reduced')
    parser.add_argument('--quick', action='store_true', help='same as --config quick')
    parser.add_argument('--dataroot', help='dataset folder (default: datasets/LUAD-HistoSeg or BCSS-WSSS for '
                                           'reference, datasets/SYNTH-LUAD or -BCSS for reduced (generated when '
                                           'absent), a folder inside the run for quick)')
    parser.add_argument('--out', help='run folder (default: runs/pipeline-<dataset>-<config>-<time>); must not exist')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0], metavar='SEED',
                        help='the --seed of every training stage; several: one run each, then the mean and '
                             'spread of every result')
    for stage in STAGE_FLAGS:
        parser.add_argument(f'--{stage}_args', default='', metavar='FLAGS',
                            help=f'extra flags for the {stage} script, after the configuration\'s (the last '
                                 f'one of a flag wins), e.g. --stage1_args="--max_epoches 4"')
    parser.add_argument('--stage1_restarts', type=int, metavar='N',
                        help='stage-1 trainings at once, from different seeds; the one whose val pseudo-masks score '
                             'best is kept (default: reduced 2 on data without train_gt/, whose second core is free '
                             'during stage 1, else 1; quick 2; reference 1)')
    parser.add_argument('--sheet_patches', type=int, default=4, help='test patches on the contact sheet')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


# ---- running the stage scripts -------------------------------------------------------------------

class StageFailed(StopRun):
    """A stage script exited with an error: one line naming its log."""


class Stage:
    """A stage script running as a child process; its output goes to logs/<name>.log."""

    def __init__(self, name, argv, run, threads):
        self.name = name
        self.log_path = os.path.join(run, 'logs', f'{name}.log')
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED='1',  # the log follows the run (tail -f)
                   TQDM_MININTERVAL='10')              # progress bars: a line every 10 s, not every step
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [sys.executable, *argv]
        self.log = open(self.log_path, 'w')
        self.log.write(f'$ {shlex.join(command)}\n')
        self.log.flush()
        log.info(f'[{name}] started; log: {self.log_path}')
        self.start = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ended = threading.Event()
        threading.Thread(target=self.reap, daemon=True).start()

    def reap(self):
        """Wait for the script in a thread of its own: its wall time ends when it does, even when the
        chain waits for it later (a baseline beside it), and os.wait4 gives its own CPU time (loader
        workers included), which the whole process's count of children would mix with others'."""
        _, status, usage = os.wait4(self.process.pid, 0)
        self.timing = {'wall_s': time.perf_counter() - self.start, 'cpu_s': usage.ru_utime + usage.ru_stime}
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.ended.set()

    def running(self):
        return not self.ended.is_set()

    def wait(self):
        """{'wall_s', 'cpu_s'}: the script's seconds from start to end and its CPU seconds;
        StageFailed if it failed. The CPU time tells what the stage costs when other programs share
        the cores."""
        self.ended.wait()
        self.log.close()
        code, timing = self.process.returncode, self.timing
        if code != 0:
            raise StageFailed(f'{self.name} failed (exit status {code}) after {timing["wall_s"]:.0f} s; its last '
                              f'line: {last_line(self.log_path)!r}; the whole output: {self.log_path}')
        log.info(f'[{self.name}] done in {timing["wall_s"]:.1f} s (CPU {timing["cpu_s"]:.1f} s)')
        return timing

    def stop(self):
        # A signal, not Popen.terminate, whose poll() would race the reaping thread; the pid is
        # still this child's until that thread reaps it.
        if self.running():
            os.kill(self.process.pid, signal.SIGTERM)
            self.ended.wait()
        self.log.close()


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_line(path):
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f.read().replace('\r', '\n').splitlines() if line.strip()]
    return lines[-1] if lines else ''


def run_stage(name, argv, run, threads):
    return Stage(name, argv, run, threads).wait()


# ---- data ----------------------------------------------------------------------------------------

def choose_config(args):
    if args.quick:
        return 'quick'
    if args.config:
        return args.config
    released = os.path.join(ROOT, 'datasets', DATASETS[args.dataset].released_folder)
    return 'reference' if os.path.isdir(released) else 'reduced'


def default_dataroot(config_name, dataset, run):
    if config_name == 'reference':
        return os.path.join(ROOT, 'datasets', DATASETS[dataset].released_folder)
    if config_name == 'reduced':
        return os.path.join(ROOT, 'datasets', DATASETS[dataset].synthetic_folder)
    return os.path.join(run, 'synthetic')  # quick: a throw-away dataset that goes with the run


def prepare_dataset(dataroot, dataset, spec, run, threads, check):
    """Generate the synthetic dataset when it is missing; returns the time that took (None if it
    was there). With `check`, a synthetic dataset there already must be the configuration's:
    one made otherwise would silently change the time taken and the results."""
    if os.path.isdir(dataroot):
        if spec is not None and check:
            check_synthetic(dataroot, spec)
        return None
    if spec is None:
        raise InputError(f'{dataroot}: dataset folder not found (see datasets/README.md for the released datasets; '
                         f'without them, --config reduced runs on a synthetic one)')
    argv = ['-m', 'tool.data.synth', '--out', dataroot, '--dataset', dataset, '--seed', '0',
            *[f'--{key}={value}' for key, value in spec.items()]]
    return run_stage('data', argv, run, threads)


def check_synthetic(dataroot, spec):
    train = os.path.join(dataroot, 'train')
    names = list_pngs(train) if os.path.isdir(train) else []
    size = Image.open(os.path.join(train, names[0])).size if names else None
    if len(names) != spec['train'] or size != (spec['size'], spec['size']):
        found = f'{len(names)} train patches of {size[0]} px' if names else 'no train patches'
        raise InputError(f'{dataroot}: holds {found}, this configuration expects {spec["train"]} of {spec["size"]} px; '
                         f'remove the folder (it is generated again) or give another --dataroot')


def training_length(config, train_folder):
    """{stage: its epoch flags}: the configuration's patches seen over the number of training
    patches, rounded, at least one epoch."""
    if 'patches_seen' not in config:
        return {}
    patches = len(list_pngs(train_folder))
    return {stage: [item for flag, seen in flags for item in (flag, str(max(1, round(seen / patches))))]
            for stage, flags in config['patches_seen'].items()}


def link_dataset(run, dataroot):
    """run/data: links to the dataset's splits, and train_PM -> ../pseudo_masks, the run's own
    pseudo-masks. Stage 2 reads <dataroot>/train_PM; this way the dataset stays untouched and
    runs do not overwrite each other's masks."""
    view = os.path.join(run, 'data')
    os.makedirs(view)
    for name in ('train', 'train_gt', 'val', 'test'):
        if os.path.isdir(os.path.join(dataroot, name)):
            os.symlink(os.path.abspath(os.path.join(dataroot, name)), os.path.join(view, name))
    os.symlink(os.path.join('..', 'pseudo_masks'), os.path.join(view, 'train_PM'))
    return view


def stage1_restarts(config, baseline_beside):
    """The configuration's number of stage-1 restarts; FREE_CORE: the second of two cores, unless
    the fully-supervised baseline trains on it."""
    restarts = config.get('stage1_restarts', 1)
    if restarts == FREE_CORE:
        return 1 if baseline_beside else 2
    return restarts


RESTART_SEED_STEP = 1000  # apart from other runs' seeds


def restart_seed(seed, k):
    """The seed of restart k of a run at `seed` (restart 0: the run's own)."""
    return seed + RESTART_SEED_STEP * k


def train_stage1(run, data, dataset, config, length, seed, extra, threads, restarts):
    """Stage 1 and the pseudo-masks of the val patches, into run/stage1 and run/pseudo_masks_val;
    returns the timing of each. With restarts > 1, that many stage-1 trainings run at once, each
    at its own seed (the first at the run's), each one's val pseudo-masks are scored against
    val/mask, and the one whose three layers score best, weighted as the stage-2 loss weights
    them, is kept: from random initialisation a seed can end with a classifier whose CAMs miss a
    class, which val shows (docs/results.md). The others stay in run/stage1_restarts/, with
    restarts.json saying what each scored."""
    # (folder, suffix of its logs) of each restart
    folders = [('stage1', '')] if restarts == 1 else [(f'stage1_restarts/restart-{k}', f'-restart-{k}')
                                                      for k in range(restarts)]
    stage1 = run_beside([(f'stage1{tag}', ['1_train_stage1.py', '--dataroot', data, '--dataset', dataset,
                                          '--save_folder', os.path.join(run, folder), *config['stage1'], *length,
                                          '--seed', str(restart_seed(seed, k)), *extra['stage1']])
                         for k, (folder, tag) in enumerate(folders)], run, threads)
    # The same rule on the val patches (stage 2 needs a val split anyway): the pseudo-masks'
    # score that a dataset without train_gt/ can give.
    val_masks = run_beside([(f'pseudo_masks_val{tag}', [
        '2_generate_PM.py', '--dataroot', data, '--dataset', dataset, '--weights',
        os.path.join(run, folder, f'stage1_checkpoint_trained_on_{dataset}.pth'), '--split', 'val',
        '--out', os.path.join(run, val_masks_folder(folder)), *config['pseudo_masks'], *extra['pseudo_masks']])
        for folder, tag in folders], run, threads)
    if restarts > 1:
        keep_best_restart(run, [folder for folder, _ in folders], seed)
    return stage1, val_masks


def val_masks_folder(stage1_folder):
    return 'pseudo_masks_val' if stage1_folder == 'stage1' else f'{stage1_folder}-pseudo_masks_val'


def run_beside(commands, run, threads):
    """The stage scripts [(log name, argv)] all at once; the wall time of the longest, the CPU time
    of all of them."""
    stages = [Stage(name, argv, run, threads) for name, argv in commands]
    try:
        timings = [stage.wait() for stage in stages]
    finally:
        for stage in stages:
            stage.stop()
    return {'wall_s': max(t['wall_s'] for t in timings), 'cpu_s': sum(t['cpu_s'] for t in timings)}


def pseudo_mask_scores(masks_folder):
    """{layer: MIoU} of the pseudo-masks in a 2_generate_PM.py output folder."""
    layers = read_json(os.path.join(masks_folder, 'pseudo_mask_metrics.json'))['layers']
    return {layer: layers[layer]['miou'] for layer in PAPER_LAYERS}


def best_restart(weighted_scores):
    """The index of the restart kept: the best loss-weighted val pseudo-masks, the first of equal
    ones (the rule of the pipeline and of the recipe search)."""
    return max(range(len(weighted_scores)), key=weighted_scores.__getitem__)


def keep_best_restart(run, names, seed):
    """Move the restart with the best loss-weighted val pseudo-masks to run/stage1 and its masks to
    run/pseudo_masks_val (the first of equal ones); restarts.json records every restart's scores."""
    records = []
    for k, name in enumerate(names):
        pm_val = pseudo_mask_scores(os.path.join(run, val_masks_folder(name)))
        records.append({'restart': k, 'seed': restart_seed(seed, k),
                        'cam_val': read_json(os.path.join(run, name, 'stage1_val_metrics.json'))['miou'],
                        'pm_val': pm_val, 'pm_val_weighted': loss_weighted(pm_val)})
    kept = best_restart([r['pm_val_weighted'] for r in records])
    for record in records:
        record['kept'] = record['restart'] == kept
    os.rename(os.path.join(run, names[kept]), os.path.join(run, 'stage1'))
    os.rename(os.path.join(run, val_masks_folder(names[kept])), os.path.join(run, 'pseudo_masks_val'))
    save_text(json.dumps(records, indent=2) + '\n', os.path.join(run, 'stage1_restarts', 'restarts.json'))
    log.info('stage 1: kept restart {} of {} (seed {}); loss-weighted val pseudo-masks {}'.format(
        kept, len(names), records[kept]['seed'], ', '.join(f'{r["pm_val_weighted"]:.4f}' for r in records)))


# ---- one run of the chain --------------------------------------------------------------------------

def run_chain(run, dataroot, dataset, config, extra, seed, sheet_patches):
    """Every stage of one seed into the folder `run`; returns {stage: timing}."""
    threads, times = config['threads'], {}
    data = link_dataset(run, dataroot)
    has_truth = os.path.isdir(os.path.join(data, 'train_gt'))
    length = training_length(config, os.path.join(data, 'train'))
    if length:
        log.info('training length from the patches seen: ' + ', '.join(f'{stage} {" ".join(flag)}'
                                                                      for stage, flag in length.items()))
    stage1_weights = os.path.join(run, 'stage1', f'stage1_checkpoint_trained_on_{dataset}.pth')
    seeded = ['--seed', str(seed)]

    def stage2_argv(supervision, folder):
        return ['3_train_stage2.py', '--dataroot', data, '--dataset', dataset, *config['stage2'],
                *length.get('stage2', []), *seeded, *extra['stage2'], '--supervision', supervision,
                '--savepath', os.path.join(run, folder)]

    baseline_argv = [*stage2_argv('gt', 'fully_supervised'), '--Is_GM', 'False']
    ablation_argv = [*stage2_argv('bn7', 'ablation_bn7'), '--Is_GM', 'False']
    running = []  # stages started beside the chain, stopped if anything fails

    def start(name, argv):
        running.append(Stage(name, argv, run, threads))
        return running[-1]

    try:
        # The baseline needs nothing from stage 1: where cores allow, it trains beside the weakly
        # supervised chain, whose stages depend on each other and cannot overlap; the ablation
        # follows it on the same core once the pseudo-masks exist.
        baseline = start('fully_supervised', baseline_argv) if has_truth and config['alongside'] else None
        restarts = stage1_restarts(config, baseline_beside=baseline is not None)
        times['stage1'], times['pseudo_masks_val'] = train_stage1(run, data, dataset, config, length.get('stage1', []),
                                                                  seed, extra, threads, restarts)
        # With nothing beside it (no baseline, or one already done) the pseudo-masks of the
        # training patches, eight Grad-CAM views each with --tta d4, take every core (the
        # library's number of threads; the demo's 800 patches: 44 s on two, 60 s on one).
        alone = baseline is None or not baseline.running()
        times['pseudo_masks'] = run_stage('pseudo_masks', [
            '2_generate_PM.py', '--dataroot', data, '--dataset', dataset, '--weights', stage1_weights,
            '--out', os.path.join(run, 'pseudo_masks'), *config['pseudo_masks'], *extra['pseudo_masks']], run,
            None if alone else threads)
        stage2 = start('stage2', [*stage2_argv('multilayer', 'stage2'), '--resume_stage1', stage1_weights,
                                  '--Is_GM', 'True'])
        if baseline is not None:
            times['fully_supervised'] = baseline.wait()
        ablation = start('ablation_bn7', ablation_argv) if config['ablation'] and config['alongside'] else None
        times['stage2'] = stage2.wait()
        if ablation is not None:
            times['ablation_bn7'] = ablation.wait()
        if has_truth and baseline is None:
            times['fully_supervised'] = run_stage('fully_supervised', baseline_argv, run, threads)
        if config['ablation'] and ablation is None:
            times['ablation_bn7'] = run_stage('ablation_bn7', ablation_argv, run, threads)
    finally:
        for stage in running:
            stage.stop()

    start_time, cpu_start = time.perf_counter(), time.process_time()
    stage2_weights = os.path.join(run, 'stage2', f'stage2_checkpoint_trained_on_{dataset}.pth')
    infer_cpu = 0.0
    # The test patches, and with train_gt the training patches: stage 2 against the pseudo-masks
    # it learnt from, scored on the same patches.
    for split, images, truth in (('test', 'test/img', 'test/mask'), ('train', 'train', 'train_gt')):
        if split == 'train' and not has_truth:
            continue
        infer_cpu += run_stage(f'{split}_predictions', [
            '4_infer.py', '--checkpoint', stage2_weights, '--input', os.path.join(data, images),
            '--masks', os.path.join(data, truth), '--out', os.path.join(run, f'{split}_predictions'),
            '--dataset', dataset, *config['infer'], *extra['infer']], run, threads)['cpu_s']
    if sheet_patches:
        save_contact_sheet(os.path.join(run, 'contact_sheet.png'), data, dataset, stage1_weights,
                           os.path.join(run, 'test_predictions', 'masks'), sheet_patches, threads)
    times['predictions'] = {'wall_s': time.perf_counter() - start_time,
                            'cpu_s': infer_cpu + time.process_time() - cpu_start}
    for name in [*RESUME_FILES, *glob.glob('stage1_restarts/*/stage1_resume.pth', root_dir=run)]:
        if os.path.isfile(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
    return times


# ---- results ---------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def scores(record):
    return {'miou': record['miou'], 'fwiou': record['fwiou']}


def validation_epochs(metrics_path):
    """The validation records of a stage-2 metrics.jsonl, epoch by epoch."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get('split') == 'val']


def best_epoch(records):
    """The best validation record (the first of equal ones, as stage 2 keeps the first): the
    checkpoint it tested."""
    return max(records, key=lambda r: r['miou'])


def best_validation(metrics_path):
    """MIoU and FwIoU of the best validation epoch in a stage-2 metrics.jsonl."""
    return scores(best_epoch(validation_epochs(metrics_path)))


def collect_summary(run, dataset, config_name, dataroot, times, seed, alongside):
    """Every stage's headline numbers from the files the stages wrote; per-class IoU of the
    stage-2 models' test (no gate)."""
    test = {folder: read_json(os.path.join(run, folder, 'test_metrics.json'))['modes']
            for folder in ('stage2', 'ablation_bn7', 'fully_supervised')
            if os.path.isfile(os.path.join(run, folder, 'test_metrics.json'))}
    val_layers = read_json(os.path.join(run, 'pseudo_masks_val', 'pseudo_mask_metrics.json'))['layers']
    summary = {
        'dataset': dataset, 'config': config_name, 'dataroot': dataroot, 'run': run, 'seed': seed,
        'stage1_cam_val': scores(read_json(os.path.join(run, 'stage1', 'stage1_val_metrics.json'))),
        'stage1_cam_test': scores(read_json(os.path.join(run, 'stage1', 'stage1_test_metrics.json'))),
        'pseudo_masks_val': {f'PM_{layer}': scores(val_layers[layer]) for layer in PAPER_LAYERS},
        'pseudo_masks_train': None,
        'stage2_val': best_validation(os.path.join(run, 'stage2', 'metrics.jsonl')),
        'stage2_train': None,
        'stage2_test': {mode: scores(test['stage2'][mode]) for mode, _ in GATES if mode in test['stage2']},
        'ablation_bn7_test': scores(test['ablation_bn7']['no_gate']) if 'ablation_bn7' in test else None,
        'fully_supervised_test': scores(test['fully_supervised']['no_gate']) if 'fully_supervised' in test else None,
        'class_iou_test': {folder: modes['no_gate']['iou'] for folder, modes in test.items()},
        'gap_points': None,
        'stage1_restarts': (read_json(os.path.join(run, 'stage1_restarts', 'restarts.json'))
                            if os.path.isfile(os.path.join(run, 'stage1_restarts', 'restarts.json')) else None),
        'alongside': alongside,
        'times': {stage: {k: round(v, 1) for k, v in timing.items()} for stage, timing in times.items()},
    }
    if os.path.isfile(os.path.join(run, 'train_predictions', 'metrics.json')):
        layers = read_json(os.path.join(run, 'pseudo_masks', 'pseudo_mask_metrics.json'))['layers']
        summary['pseudo_masks_train'] = {f'PM_{layer}': scores(layers[layer]) for layer in PAPER_LAYERS}
        summary['stage2_train'] = scores(read_json(os.path.join(run, 'train_predictions', 'metrics.json')))
    if summary['fully_supervised_test'] is not None:
        summary['gap_points'] = round(100 * (summary['fully_supervised_test']['miou']
                                             - summary['stage2_test']['no_gate']['miou']), 2)
    return summary


DIAGNOSTIC = ('rows marked "diagnostic" need the pixel truth of the training patches (train_gt/), which a real '
              'dataset does not have: no choice is made on them, nor on test; recipes are chosen on the val rows')


def table_rows(summary):
    """[(stage, result, scores or None, timing or None, note)] in the order of the table: for each
    stage its val score (what a recipe is chosen by), then its test score and the diagnostics."""
    times = summary['times'].get
    pseudo_val, pseudo = summary['pseudo_masks_val'], summary['pseudo_masks_train']
    rows = [('data', f'dataset {summary["dataroot"]}' + (' (generated)' if times('data') else ' (present)'),
             None, times('data'), ''),
            ('stage 1', 'CAM, val patches', summary['stage1_cam_val'], times('stage1'), ''),
            ('', 'CAM, test patches', summary['stage1_cam_test'], None, '')]
    rows += [('pseudo-masks' if i == 0 else '', f'PM_{layer}, val patches vs val/mask',
              pseudo_val[f'PM_{layer}'], times('pseudo_masks_val') if i == 0 else None, '')
             for i, layer in enumerate(PAPER_LAYERS)]
    rows += [('', f'PM_{layer}, train patches vs train_gt (diagnostic)',
              pseudo and pseudo[f'PM_{layer}'], times('pseudo_masks') if i == 0 else None, '')
             for i, layer in enumerate(PAPER_LAYERS)]
    rows.append(('stage 2', 'val, best epoch (the checkpoint tested)', summary['stage2_val'], times('stage2'), ''))
    rows.append(('', 'train patches vs train_gt (diagnostic: what it learnt from)', summary['stage2_train'],
                 None, ''))
    rows += [('', f'test, {name}', summary['stage2_test'][mode], None, '')
             for mode, name in GATES if mode in summary['stage2_test']]
    rows.append(('ablation', 'stage 2 on PM_bn7 alone (--supervision bn7); test, no gate',
                 summary['ablation_bn7_test'], times('ablation_bn7'), ' (beside stage 2)'))
    rows.append(('fully supervised', 'same model, data and budget, train_gt (diagnostic); test, no gate',
                 summary['fully_supervised_test'], times('fully_supervised'), ' (beside stages 1-2)'))
    rows.append(('test', 'predictions of the test and train patches, contact sheet', None, times('predictions'), ''))
    rows.append(('total', 'all of the above', None, times('total'), ''))
    return rows


def fmt(v):
    return 'n/a' if v is None else f'{v:.4f}'


def summary_table(summary):
    """The summary as Markdown: one row per result, each stage's times on its first row; then
    what the rows say against each other, and the per-class IoU of the stage-2 models."""
    lines = ['| stage | result | MIoU | FwIoU | wall (s) | CPU (s) |', '|---|---|---:|---:|---:|---:|']
    for stage, result, metrics, timing, note in table_rows(summary):
        scored = stage not in ('data', 'test', 'total')
        lines.append('| ' + ' | '.join([
            stage, result, fmt(metrics and metrics['miou']) if scored else '',
            fmt(metrics and metrics['fwiou']) if scored else '',
            f'{timing["wall_s"]:.1f}{note if summary["alongside"] else ""}' if timing else '',
            f'{timing["cpu_s"]:.1f}' if timing else '']) + ' |')
    lines += [''] + findings(summary)
    if summary['pseudo_masks_train'] is not None or summary['fully_supervised_test'] is not None:
        lines += ['', DIAGNOSTIC]
    if summary['class_iou_test']:
        names = list(next(iter(summary['class_iou_test'].values())))
        lines += ['', '| test, no gate: IoU | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
        lines += [f'| {MODEL_NAMES[folder]} | ' + ' | '.join(fmt(iou[c]) for c in names) + ' |'
                  for folder, iou in summary['class_iou_test'].items()]
    return '\n'.join(lines) + '\n'


MODEL_NAMES = {'stage2': 'stage 2 (multi-layer)', 'ablation_bn7': 'stage 2 on PM_bn7 alone',
               'fully_supervised': 'fully supervised'}


def findings(summary):
    """Sentences comparing the rows: which stage-1 restart was kept, the gap to full supervision,
    stage 2 against its pseudo-masks on the same patches, the multi-layer loss against bn7 alone."""
    said = []
    weak = summary['stage2_test']['no_gate']['miou']
    if summary['stage1_restarts']:
        restarts = summary['stage1_restarts']
        kept = next(r for r in restarts if r['kept'])
        said.append(f'stage 1 kept restart {kept["restart"]} (seed {kept["seed"]}) of {len(restarts)}: loss-weighted '
                    f'val pseudo-masks ' + ', '.join(f'{r["pm_val_weighted"]:.4f}' for r in restarts)
                    + ', CAMs on val ' + ', '.join(f'{r["cam_val"]:.4f}' for r in restarts))
    if summary['gap_points'] is not None:
        gap = summary['gap_points']
        said.append(f'stage 2 (weakly supervised, no gate) is {abs(gap):.2f} MIoU points '
                    f'{"below" if gap >= 0 else "above"} the fully-supervised model')
    if summary['stage2_train'] is not None:
        layer, best = max(summary['pseudo_masks_train'].items(), key=lambda item: item[1]['miou'])
        delta = 100 * (summary['stage2_train']['miou'] - best['miou'])
        said.append(f'on its training patches stage 2 is {abs(delta):.2f} points {"above" if delta >= 0 else "below"} '
                    f'its best pseudo-masks ({layer})')
    if summary['ablation_bn7_test'] is not None:
        delta = 100 * (weak - summary['ablation_bn7_test']['miou'])
        said.append(f'the multi-layer loss is {abs(delta):.2f} points {"above" if delta >= 0 else "below"} '
                    f'PM_bn7 alone on the test patches')
    return said


# ---- several seeds ---------------------------------------------------------------------------------

def spread(values):
    """(mean, standard deviation, min, max) of a list of numbers (sd 0 for one value)."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
            min(values), max(values))


def seeds_table(summaries):
    """Markdown: every scored row of the single-run table as mean, sd and range of its MIoU over the
    seeds, each seed's value, and the per-class IoU of stage 2 likewise; then the wall and CPU
    time of a whole run."""
    seeds = [s['seed'] for s in summaries]
    header = ('| stage | result | MIoU mean | sd | min | max | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |')
    lines = [header, '|---|---|' + '---:|' * (4 + len(seeds))]
    rows_by_seed = [table_rows(s) for s in summaries]
    for i, (stage, result, metrics, _, _) in enumerate(rows_by_seed[0]):
        if metrics is None or stage in ('data', 'test', 'total'):
            continue
        values = [rows[i][2]['miou'] for rows in rows_by_seed]
        lines.append(f'| {stage} | {result} | ' + ' | '.join(fmt(v) for v in spread(values)) + ' | '
                     + ' | '.join(fmt(v) for v in values) + ' |')
    if summaries[0]['gap_points'] is not None:
        values = [s['gap_points'] for s in summaries]
        lines.append('| | fully supervised minus stage 2 (points) | ' + ' | '.join(f'{v:.2f}' for v in spread(values))
                     + ' | ' + ' | '.join(f'{v:.2f}' for v in values) + ' |')
    for folder, name in MODEL_NAMES.items():
        if folder not in summaries[0]['class_iou_test']:
            continue
        for c in summaries[0]['class_iou_test'][folder]:
            values = [s['class_iou_test'][folder][c] for s in summaries]
            lines.append(f'| {name} | IoU {c}, test, no gate | ' + ' | '.join(fmt(v) for v in spread(values))
                         + ' | ' + ' | '.join(fmt(v) for v in values) + ' |')
    for key in ('wall_s', 'cpu_s'):
        values = [s['times']['total'][key] for s in summaries]
        lines.append(f'| total | {"wall" if key == "wall_s" else "CPU"} time of a run (s) | '
                     + ' | '.join(f'{v:.0f}' for v in spread(values)) + ' | ' + ' | '.join(f'{v:.0f}' for v in values)
                     + ' |')
    return '\n'.join(lines) + '\n'


# ---- main ------------------------------------------------------------------------------------------

def main(args):
    if args.sheet_patches < 0:
        raise InputError(f'--sheet_patches {args.sheet_patches}: must be 0 or more')
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise InputError(f'--seeds {" ".join(map(str, args.seeds))}: give different seeds, 0 or more')
    if args.stage1_restarts is not None and args.stage1_restarts < 1:
        raise InputError(f'--stage1_restarts {args.stage1_restarts}: must be 1 or more')
    config_name = choose_config(args)
    config = CONFIGS[config_name]
    if args.stage1_restarts is not None:
        config = {**config, 'stage1_restarts': args.stage1_restarts}
    # Absolute paths: the stage scripts run from the repository root, the caller may be elsewhere.
    top = os.path.abspath(args.out) if args.out else os.path.join(
        ROOT, 'runs', f'pipeline-{args.dataset}-{config_name}-{time.strftime("%Y%m%d-%H%M%S")}')
    if os.path.exists(top):
        raise InputError(f'{top}: the run folder exists already; choose another --out')
    dataroot = os.path.abspath(args.dataroot) if args.dataroot else default_dataroot(config_name, args.dataset, top)
    missing = [path for path in config['init_weights'] if not os.path.isfile(os.path.join(ROOT, path))]
    if missing:
        raise InputError(f'{missing[0]}: initial weights not found (see init_weights/README.md)')
    os.makedirs(top)
    # The record holds what the defaults resolved to, and every stage's flags.
    write_run_record(top, argparse.Namespace(**{**vars(args), 'config': config_name, 'dataroot': dataroot,
                                                'out': top, 'config_flags': config}))
    log.info(f'configuration {config_name}, dataset {dataroot}, run folder {top}')
    extra = {stage: shlex.split(getattr(args, f'{stage}_args')) for stage in STAGE_FLAGS}
    summaries = []
    for seed in args.seeds:
        started, cpu_started = time.perf_counter(), children_cpu_seconds() + time.process_time()
        times = {}
        if not summaries:  # the dataset is made once, its time counted in the first run
            times['data'] = prepare_dataset(dataroot, args.dataset, config['synthetic'], top, config['threads'],
                                            check=not args.dataroot)
        run = top if len(args.seeds) == 1 else os.path.join(top, f'seed-{seed}')
        os.makedirs(run, exist_ok=True)
        if len(args.seeds) > 1:
            log.info(f'\nseed {seed}: {run}')
        times.update(run_chain(run, dataroot, args.dataset, config, extra, seed, args.sheet_patches))
        times['total'] = {'wall_s': time.perf_counter() - started,
                          'cpu_s': children_cpu_seconds() + time.process_time() - cpu_started}
        summary = collect_summary(run, args.dataset, config_name, dataroot,
                                  {stage: t for stage, t in times.items() if t is not None}, seed, config['alongside'])
        table = summary_table(summary)
        save_text(json.dumps(summary, indent=2) + '\n', os.path.join(run, 'summary.json'))
        save_text(f'# Pipeline summary ({args.dataset}, {config_name} configuration, seed {seed})\n\n{table}',
                  os.path.join(run, 'summary.md'))
        log.info(f'\n{table}')
        summaries.append(summary)
    if len(summaries) > 1:
        table = seeds_table(summaries)
        save_text(json.dumps({'seeds': args.seeds, 'runs': summaries}, indent=2) + '\n',
                  os.path.join(top, 'summary.json'))
        save_text(f'# Pipeline summary ({args.dataset}, {config_name} configuration, seeds '
                  f'{" ".join(map(str, args.seeds))})\n\n{table}', os.path.join(top, 'summary.md'))
        log.info(f'\nover seeds {" ".join(map(str, args.seeds))}:\n\n{table}')
    log.info(f'run folder: {top} (summary.json, summary.md, contact_sheet.png, logs/)')
    return summaries

