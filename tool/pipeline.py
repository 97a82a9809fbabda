"""The whole pipeline in one command: stage 1, pseudo-masks, stage 2 with its test, predictions,
a contact sheet and one summary table (what run_pipeline.sh runs).

    python -m tool.pipeline --dataset luad                # reference run, or the synthetic demo
    python -m tool.pipeline --dataset bcss --config reduced --out runs/demo
    python -m tool.pipeline --quick                        # tiny synthetic smoke run (~1 min)

Configurations:
    reference  the released dataset (datasets/LUAD-HistoSeg or datasets/BCSS-WSSS): full-size
               models from the ImageNet / VOC weights in init_weights/ and the reference's
               hyper-parameters (its run_pipeline.sh), on the GPU when there is one;
    reduced    no released dataset: the embedded synthetic one (datasets/SYNTH-LUAD or -BCSS,
               generated when absent) with small patches and small models, sized to finish in
               about five minutes on two CPU cores;
    quick      a tiny synthetic dataset inside the run folder, for tests.
Default: reference when the released dataset is there, reduced otherwise.

Each stage runs its own script (1_train_stage1.py, 2_generate_PM.py, 3_train_stage2.py,
4_infer.py) as a child process with the same Python, so stages share nothing but files, and
each one's output goes to logs/<stage>.log. When the dataset has pixel truth for its training
patches (train_gt/, the synthetic ones do), the pseudo-masks are scored against it and a
fully-supervised model, 3_train_stage2.py --supervision gt with the same backbone, epochs,
learning rate and data, gives the upper bound the weakly-supervised result is read against.

Each stage's wall time and CPU time are measured: on cores shared with other programs the
CPU time says what the stage costs. Stages take one thread each in the CPU configurations,
where the fully-supervised baseline trains on the second core beside the chain of stages.

Everything lands in one run folder (default runs/pipeline-<dataset>-<config>-<time>/):
    run_args.json             these arguments, library versions
    data/                     links to the dataset's splits, plus train_PM -> ../pseudo_masks
                              (stage 2 reads <dataroot>/train_PM; the dataset stays untouched)
    stage1/                   classifier checkpoint, metrics.jsonl, stage1_test_metrics.json
                              (the trainings' resume files are removed once the run succeeded)
    pseudo_masks/             PM_b4_5/ PM_b5_2/ PM_bn7/, pseudo_mask_metrics.json
    stage2/                   best checkpoint, metrics.jsonl, test_metrics.json (with the gate)
    fully_supervised/         the same for the upper bound (train_gt only)
    test_predictions/         stage-2 masks and overlays of the test patches, metrics.json
    contact_sheet.png         a few test patches: image, truth, three pseudo-masks, prediction
    logs/<stage>.log          each stage's output, its command line first
    summary.json, summary.md  the table printed at the end
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

from PIL import Image

from tool.contact_sheet import save_contact_sheet
from tool.data import list_pngs
from tool.gradcam import PAPER_LAYERS
from tool.io import InputError, run_cli, save_text
from tool.utils import write_run_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = {'luad': 'LUAD-HistoSeg', 'bcss': 'BCSS-WSSS'}  # folder names under datasets/
SYNTHETIC = {'luad': 'SYNTH-LUAD', 'bcss': 'SYNTH-BCSS'}
STAGE_FLAGS = ('stage1', 'pseudo_masks', 'stage2', 'infer')  # the scripts a configuration gives flags to
# Written every epoch so that an interrupted training can continue; the pipeline does not
# continue stages, and they are large (two stage-2 ones: 340 MB in the reduced configuration).
RESUME_FILES = ('stage1/stage1_resume.pth', 'stage2/stage2_resume.pth', 'fully_supervised/stage2_resume.pth')
GATES = (('no_gate', 'no gate'), ('gate_multiply', 'gate (multiply, reference)'), ('gate_mask', 'gate (mask)'))

# Per configuration: the synthetic dataset to make (None: a released one is used), the threads of
# each stage process (None: the library's choice), whether the fully-supervised baseline runs
# beside the weakly-supervised chain instead of after it, and each stage's flags.
CONFIGS = {
    'reference': {
        'synthetic': None,
        'threads': None,
        # On a GPU the two stage-2 trainings would compete for its memory.
        'baseline_alongside': False,
        'init_weights': ['init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params',
                         'init_weights/deeplab-resnet.pth.tar'],
        'stage1': ['--weights', 'init_weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params', '--max_epoches', '20',
                   '--batch_size', '20', '--lr', '0.01', '--device', 'auto'],
        'pseudo_masks': ['--device', 'auto'],
        'stage2': ['--backbone', 'resnet', '--resume', 'init_weights/deeplab-resnet.pth.tar', '--epochs', '30',
                   '--batch-size', '20', '--lr', '0.01', '--device', 'auto'],
        'infer': ['--device', 'auto'],
    },
    # Sized for about five minutes on two cores (4 min 38 s measured, end to end): on the critical
    # path stage 1 takes ~110 s and stage 2 ~120 s of one core, the baseline as long on the other.
    # At 64 px the Grad-CAMs are 8 x 8 and the DeepLab features 4 x 4, yet the pseudo-masks reach
    # ~0.51 MIoU; more stage-2 epochs help both stage-2 models (4 epochs: 0.46 weakly vs 0.53
    # fully supervised), and the fully-supervised one more.
    'reduced': {
        'synthetic': {'size': 64, 'train': 1200, 'val': 60, 'test': 60},
        # One thread per process: these convolutions are too small to share out, and the two
        # cores are better spent running the baseline beside the weakly-supervised chain.
        'threads': 1,
        'baseline_alongside': True,
        'init_weights': [],
        # From random initialisation (no ImageNet weights here), so every layer and BatchNorm
        # trains, with real momentum; 1/16 of the reference's width.
        'stage1': ['--weights', 'none', '--width', '0.0625', '--max_epoches', '10', '--batch_size', '8',
                   '--lr', '0.02', '--momentum', '0.9', '--num_workers', '0', '--device', 'cpu'],
        'pseudo_masks': ['--batch_size', '32', '--num_workers', '0', '--device', 'cpu'],
        'stage2': ['--backbone', 'resnet18', '--resume', 'none', '--epochs', '1', '--batch-size', '8',
                   '--lr', '0.03', '--workers', '0', '--device', 'cpu'],
        'infer': ['--workers', '0', '--device', 'cpu'],
    },
    'quick': {
        'synthetic': {'size': 32, 'train': 32, 'val': 8, 'test': 8},
        'threads': 1,
        'baseline_alongside': True,
        'init_weights': [],
        'stage1': ['--weights', 'none', '--width', '0.0625', '--max_epoches', '1', '--batch_size', '8',
                   '--lr', '0.01', '--momentum', '0.9', '--num_workers', '0', '--device', 'cpu'],
        'pseudo_masks': ['--batch_size', '16', '--num_workers', '0', '--device', 'cpu'],
        'stage2': ['--backbone', 'resnet18', '--resume', 'none', '--epochs', '1', '--batch-size', '8',
                   '--lr', '0.01', '--workers', '0', '--device', 'cpu'],
        'infer': ['--workers', '0', '--device', 'cpu'],
    },
}


def get_args_parser():
    parser = argparse.ArgumentParser(description='The whole WSSS-Tissue pipeline: stage 1, pseudo-masks, stage 2, '
                                                 'test, summary table')
    parser.add_argument('--dataset', default='luad', choices=tuple(RELEASED))
    parser.add_argument('--config', choices=tuple(CONFIGS),
                        help='default: reference when datasets/<released dataset> exists, else reduced')
    parser.add_argument('--quick', action='store_true', help='same as --config quick')
    parser.add_argument('--dataroot', help='dataset folder (default: datasets/LUAD-HistoSeg or BCSS-WSSS for '
                                           'reference, datasets/SYNTH-LUAD or -BCSS for reduced (generated when '
                                           'absent), a folder inside the run for quick)')
    parser.add_argument('--out', help='run folder (default: runs/pipeline-<dataset>-<config>-<time>); must not exist')
    for stage in STAGE_FLAGS:
        parser.add_argument(f'--{stage}_args', default='', metavar='FLAGS',
                            help=f'extra flags for the {stage} script, after the configuration\'s (the last '
                                 f'one of a flag wins), e.g. --stage1_args="--max_epoches 4"')
    parser.add_argument('--sheet_patches', type=int, default=4, help='test patches on the contact sheet')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


# ---- running the stage scripts -------------------------------------------------------------------

class StageFailed(InputError):
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
        print(f'[{name}] started; log: {self.log_path}', flush=True)
        self.start = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self):
        """{'wall_s', 'cpu_s'}: seconds since the start and CPU seconds of the script; StageFailed
        if it failed. The CPU time tells what the stage costs when other programs share the cores."""
        # Children are counted when reaped, and this process reaps one at a time, here: the
        # difference is this child's own CPU time, even when it ran beside other stages.
        cpu_before = children_cpu_seconds()
        code = self.process.wait()
        timing = {'wall_s': time.perf_counter() - self.start, 'cpu_s': children_cpu_seconds() - cpu_before}
        self.log.close()
        if code != 0:
            raise StageFailed(f'{self.name} failed (exit status {code}) after {timing["wall_s"]:.0f} s; its last '
                              f'line: {last_line(self.log_path)!r}; the whole output: {self.log_path}')
        print(f'[{self.name}] done in {timing["wall_s"]:.1f} s (CPU {timing["cpu_s"]:.1f} s)', flush=True)
        return timing

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
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
    return 'reference' if os.path.isdir(os.path.join(ROOT, 'datasets', RELEASED[args.dataset])) else 'reduced'


def default_dataroot(config_name, dataset, run):
    if config_name == 'reference':
        return os.path.join(ROOT, 'datasets', RELEASED[dataset])
    if config_name == 'reduced':
        return os.path.join(ROOT, 'datasets', SYNTHETIC[dataset])
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
    argv = ['-m', 'tool.synth', '--out', dataroot, '--dataset', dataset, '--seed', '0',
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


# ---- results ---------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def scores(record):
    return {'miou': record['miou'], 'fwiou': record['fwiou']}


def collect_summary(run, dataset, config_name, dataroot, times, has_truth, baseline_alongside):
    """Every stage's headline numbers from the files the stages wrote."""
    stage2 = read_json(os.path.join(run, 'stage2', 'test_metrics.json'))['modes']
    summary = {
        'dataset': dataset, 'config': config_name, 'dataroot': dataroot, 'run': run,
        'stage1_cam_test': scores(read_json(os.path.join(run, 'stage1', 'stage1_test_metrics.json'))),
        'pseudo_masks_train': None,
        'stage2_test': {mode: scores(stage2[mode]) for mode, _ in GATES if mode in stage2},
        'fully_supervised_test': None,
        'gap_points': None,
        'baseline_alongside': baseline_alongside,
        'times': {stage: None if timing is None else {k: round(v, 1) for k, v in timing.items()}
                  for stage, timing in times.items()},
    }
    if has_truth:
        layers = read_json(os.path.join(run, 'pseudo_masks', 'pseudo_mask_metrics.json'))['layers']
        summary['pseudo_masks_train'] = {f'PM_{layer}': scores(layers[layer]) for layer in PAPER_LAYERS}
        baseline = read_json(os.path.join(run, 'fully_supervised', 'test_metrics.json'))['modes']['no_gate']
        summary['fully_supervised_test'] = scores(baseline)
        summary['gap_points'] = round(100 * (baseline['miou'] - stage2['no_gate']['miou']), 2)
    return summary


def summary_table(summary):
    """The summary as a Markdown table: one row per result, each stage's times on its first row."""
    fmt = lambda v: 'n/a' if v is None else f'{v:.4f}'
    rows = []

    def add(stage, result, metrics=None, timing=None, note=''):
        rows.append([stage, result, '' if stage == 'data' else fmt(metrics and metrics['miou']),
                     '' if stage == 'data' else fmt(metrics and metrics['fwiou']),
                     f'{timing["wall_s"]:.1f}{note}' if timing else '', f'{timing["cpu_s"]:.1f}' if timing else ''])

    times = summary['times']
    add('data', f'dataset {summary["dataroot"]}' + (' (present)' if times['data'] is None else ' (generated)'),
        timing=times['data'])
    add('stage 1', 'CAM, test patches', summary['stage1_cam_test'], times['stage1'])
    pseudo = summary['pseudo_masks_train']
    for i, layer in enumerate(PAPER_LAYERS):
        add('pseudo-masks' if i == 0 else '', f'PM_{layer}, train patches vs train_gt',
            pseudo and pseudo[f'PM_{layer}'], times['pseudo_masks'] if i == 0 else None)
    for i, (mode, name) in enumerate(GATES):
        if mode in summary['stage2_test']:
            add('stage 2' if i == 0 else '', f'test, {name}', summary['stage2_test'][mode],
                times['stage2'] if i == 0 else None)
    add('fully supervised', 'same model, data and budget, train_gt; test, no gate', summary['fully_supervised_test'],
        times['fully_supervised'], ' (beside stages 1-2)' if summary['baseline_alongside'] else '')
    rows.append(['test', 'predictions of the test patches, contact sheet', '', '',
                 f'{times["predictions"]["wall_s"]:.1f}', f'{times["predictions"]["cpu_s"]:.1f}'])
    rows.append(['total', 'all of the above', '', '', f'{times["total"]["wall_s"]:.1f}',
                 f'{times["total"]["cpu_s"]:.1f}'])
    lines = ['| stage | result | MIoU | FwIoU | wall (s) | CPU (s) |', '|---|---|---:|---:|---:|---:|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    gap = summary['gap_points']
    if gap is not None:
        lines.append(f'\nstage 2 (weakly supervised, no gate) is {abs(gap):.2f} MIoU points '
                     f'{"below" if gap >= 0 else "above"} the fully-supervised model')
    return '\n'.join(lines) + '\n'


# ---- main ------------------------------------------------------------------------------------------

def main(args):
    if args.sheet_patches < 0:
        raise InputError(f'--sheet_patches {args.sheet_patches}: must be 0 or more')
    started, cpu_started = time.perf_counter(), time.process_time()
    config_name = choose_config(args)
    config = CONFIGS[config_name]
    # Absolute paths: the stage scripts run from the repository root, the caller may be elsewhere.
    run = os.path.abspath(args.out) if args.out else os.path.join(
        ROOT, 'runs', f'pipeline-{args.dataset}-{config_name}-{time.strftime("%Y%m%d-%H%M%S")}')
    if os.path.exists(run):
        raise InputError(f'{run}: the run folder exists already; choose another --out')
    dataroot = os.path.abspath(args.dataroot) if args.dataroot else default_dataroot(config_name, args.dataset, run)
    missing = [path for path in config['init_weights'] if not os.path.isfile(os.path.join(ROOT, path))]
    if missing:
        raise InputError(f'{missing[0]}: initial weights not found (see init_weights/README.md)')
    os.makedirs(run)
    # The record holds what the defaults resolved to, and every stage's flags.
    write_run_record(run, argparse.Namespace(**{**vars(args), 'config': config_name, 'dataroot': dataroot,
                                                'out': run, 'config_flags': config}))
    print(f'configuration {config_name}, dataset {dataroot}, run folder {run}', flush=True)
    extra = {stage: shlex.split(getattr(args, f'{stage}_args')) for stage in STAGE_FLAGS}
    threads, times = config['threads'], {}

    times['data'] = prepare_dataset(dataroot, args.dataset, config['synthetic'], run, threads, check=not args.dataroot)
    data = link_dataset(run, dataroot)
    has_truth = os.path.isdir(os.path.join(data, 'train_gt'))
    stage1_weights = os.path.join(run, 'stage1', f'stage1_checkpoint_trained_on_{args.dataset}.pth')
    stage2_common = ['--dataroot', data, '--dataset', args.dataset, *config['stage2'], *extra['stage2']]
    baseline_argv = ['3_train_stage2.py', *stage2_common, '--supervision', 'gt', '--Is_GM', 'False',
                     '--savepath', os.path.join(run, 'fully_supervised')]
    # The baseline needs nothing from stage 1: where cores allow, it trains beside the weakly
    # supervised chain, whose stages depend on each other and cannot overlap.
    alongside = has_truth and config['baseline_alongside']
    baseline = Stage('fully_supervised', baseline_argv, run, threads) if alongside else None
    try:
        times['stage1'] = run_stage('stage1', ['1_train_stage1.py', '--dataroot', data, '--dataset', args.dataset,
                                               '--save_folder', os.path.join(run, 'stage1'),
                                               *config['stage1'], *extra['stage1']], run, threads)
        times['pseudo_masks'] = run_stage('pseudo_masks', [
            '2_generate_PM.py', '--dataroot', data, '--dataset', args.dataset, '--weights', stage1_weights,
            '--out', os.path.join(run, 'pseudo_masks'), *config['pseudo_masks'], *extra['pseudo_masks']], run, threads)
        times['stage2'] = run_stage('stage2', ['3_train_stage2.py', *stage2_common, '--supervision', 'multilayer',
                                               '--resume_stage1', stage1_weights, '--Is_GM', 'True',
                                               '--savepath', os.path.join(run, 'stage2')], run, threads)
        if baseline is not None:
            times['fully_supervised'] = baseline.wait()
        elif has_truth:
            times['fully_supervised'] = run_stage('fully_supervised', baseline_argv, run, threads)
        else:
            times['fully_supervised'] = None
    finally:
        if baseline is not None:
            baseline.stop()

    start, cpu_start = time.perf_counter(), time.process_time()
    predictions = os.path.join(run, 'test_predictions')
    stage2_weights = os.path.join(run, 'stage2', f'stage2_checkpoint_trained_on_{args.dataset}.pth')
    infer = run_stage('predictions', [
        '4_infer.py', '--checkpoint', stage2_weights, '--input', os.path.join(data, 'test', 'img'),
        '--masks', os.path.join(data, 'test', 'mask'), '--out', predictions, '--dataset', args.dataset,
        *config['infer'], *extra['infer']], run, threads)
    if args.sheet_patches:
        save_contact_sheet(os.path.join(run, 'contact_sheet.png'), data, args.dataset, stage1_weights,
                           os.path.join(predictions, 'masks'), args.sheet_patches, threads)
    times['predictions'] = {'wall_s': time.perf_counter() - start,
                            'cpu_s': infer['cpu_s'] + time.process_time() - cpu_start}
    times['total'] = {'wall_s': time.perf_counter() - started,
                      'cpu_s': children_cpu_seconds() + time.process_time() - cpu_started}

    for name in RESUME_FILES:
        if os.path.isfile(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
    summary = collect_summary(run, args.dataset, config_name, dataroot, times, has_truth, baseline is not None)
    table = summary_table(summary)
    save_text(json.dumps(summary, indent=2) + '\n', os.path.join(run, 'summary.json'))
    save_text(f'# Pipeline summary ({args.dataset}, {config_name} configuration)\n\n{table}',
              os.path.join(run, 'summary.md'))
    print(f'\n{table}\nrun folder: {run} (summary.json, summary.md, contact_sheet.png, logs/)')
    return summary


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
