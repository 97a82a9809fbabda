"""Choose the reduced recipe the way a weakly-supervised user must: on the validation split.

    python -m tool.pipeline.choose_recipe --dataroot datasets/SYNTH-LUAD --out runs/recipe
    python -m tool.pipeline.choose_recipe --dataroot datasets/SYNTH-LUAD --out runs/recipe \\
        --seeds 0 1 2 --stage1 w16-lr005-e10 w16-lr01-e10 --stage2_budget_s 120

Stage-1 candidates (width, learning rate, epochs, first epoch of PDA) are trained from random
initialisation; each is scored by its CAMs on the val patches and by the pseudo-masks the paper's
rule makes for the val patches from the classes in their masks (2_generate_PM.py --split val).
The recipe's stage 1 is the candidate with the best val pseudo-masks (each layer weighted as the
stage-2 loss weights it; mean over --seeds) among those that train within --stage1_budget_s; at each seed its
pseudo-masks of the training patches are what the stage-2 candidates (width, learning rate,
epochs) train on, and the recipe's stage 2 is the one with the best mean validation MIoU among
those within --stage2_budget_s. Each candidate's training time is measured (wall, with --jobs
candidates sharing the cores), since the recipe must also fit the demo's time. The tables hold
val scores only: the stages also score the test split and, where the data have train_gt/, the
training patches, and this script reads neither. Every candidate runs its stage scripts as child
processes with one thread, --jobs at a time; a candidate whose outputs exist is not run again, so
a killed search resumes, and a later search with more seeds or fewer candidates reuses the runs
it shares with an earlier one. With --restarts N a candidate's result at a seed is the best of N
restarts, as the pipeline's --stage1_restarts keeps it (restart k trains at seed + 1000 k, in the
folder of that seed), and stage 2 trains on the kept restart's pseudo-masks. With --pseudo_masks
pm pm-d4 every stage-1 run is also scored with its pseudo-masks made over the patch's eight
symmetries (2_generate_PM.py --tta d4), without training again; each pairing is a row
(`<stage 1>+pm-d4`), chosen by the same rule.

Layout of --out: <stage-1 candidate>/seed-<s>/ (its checkpoint and logs, PM_val/, PM_train/ for
the one chosen, data/ the dataset's splits with train_PM -> ../PM_train), inside it <stage-2
candidate>/ (the same inside <stage-1 candidate>/seed-<s>/pm-d4/ for the d4 pseudo-masks),
and recipe_search.md (the tables) and recipe_search.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tool.core.errors import InputError, StopRun, run_cli
from tool.core.files import save_text
from tool.core.log import log
from tool.pipeline.runner import (best_epoch, best_restart, pseudo_mask_scores, read_json, restart_seed, spread,
                                  validation_epochs)
from tool.method.paper_layers import PAPER_LAYERS, loss_weighted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The candidates of docs/results.md ("Choosing the recipe"); epochs of the embedded 800 training
# patches. A candidate's flags follow STAGE1_FIXED and the last one of a flag wins, so batch 8
# holds unless a candidate names another (-b4).
STAGE1_CANDIDATES = {
    'w8-lr005-e10': ['--width', '0.125', '--lr', '0.005', '--max_epoches', '10'],   # the recipe before
    'w8-lr005-e5': ['--width', '0.125', '--lr', '0.005', '--max_epoches', '5'],
    'w12-lr005-e7': ['--width', '0.09375', '--lr', '0.005', '--max_epoches', '7'],
    'w16-lr005-e10': ['--width', '0.0625', '--lr', '0.005', '--max_epoches', '10'],
    'w16-lr01-e10': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '10'],
    'w16-lr005-e7': ['--width', '0.0625', '--lr', '0.005', '--max_epoches', '7'],
    'w16-lr0075-e7': ['--width', '0.0625', '--lr', '0.0075', '--max_epoches', '7'],
    'w16-lr01-e7': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '7'],
    # PDA from the 7th epoch instead of the reference's 4th (--pda_from_epoch is 0-based)
    'w16-lr01-e10-pda6': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '10', '--pda_from_epoch', '6'],
    'w16-lr01-e15-pda9': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '15', '--pda_from_epoch', '9'],
    'w16-lr01-e20-pda12': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '20', '--pda_from_epoch', '12'],
    # stage 1 still fits its training patches at the last epoch: the same updates at larger steps
    'w16-lr02-e20-pda12': ['--width', '0.0625', '--lr', '0.02', '--max_epoches', '20', '--pda_from_epoch', '12'],
    'w16-lr03-e20-pda12': ['--width', '0.0625', '--lr', '0.03', '--max_epoches', '20', '--pda_from_epoch', '12'],
    # Adam: larger steps where the gradients are small, often faster from random initialisation
    # (lr 0.001 at seed 0 alone: weighted val pseudo-masks 0.880, below lr 0.0003's 0.895)
    'w16-adam0003-e20-pda12': ['--width', '0.0625', '--optimizer', 'adam', '--lr', '0.0003', '--max_epoches', '20',
                               '--pda_from_epoch', '12'],
    # the reference's dropout rates were set for 4096 features: of the 256 at 1/16 width each dropped
    # channel takes 16 times the share, so the share dropped from a patch varies 4 times as much
    'w16-lr01-e20-pda12-d05': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '20', '--pda_from_epoch', '12',
                               '--dropout_scale', '0.5'],
    'w16-lr01-e20-pda12-d0': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '20', '--pda_from_epoch', '12',
                              '--dropout_scale', '0'],
    # twice the updates of half the batch, the same patches seen
    'w16-lr01-e20-pda12-b4': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '20', '--pda_from_epoch', '12',
                              '--batch_size', '4'],
}
STAGE2_CANDIDATES = {
    's2-w50-lr03-e6': ['--width', '0.5', '--lr', '0.03', '--epochs', '6'],   # the recipe before
    's2-w25-lr03-e6': ['--width', '0.25', '--lr', '0.03', '--epochs', '6'],
    's2-w25-lr05-e6': ['--width', '0.25', '--lr', '0.05', '--epochs', '6'],
    's2-w25-lr03-e10': ['--width', '0.25', '--lr', '0.03', '--epochs', '10'],
    's2-w25-lr03-e15': ['--width', '0.25', '--lr', '0.03', '--epochs', '15'],
}
# How the pseudo-masks are made from a stage-1 candidate's Grad-CAMs: on the patch alone, as the
# reference, or as the mean over the patch's eight rotations and mirror images (tool/method/dihedral.py).
REFERENCE_PM = 'pm'
PSEUDO_MASK_CANDIDATES = {
    REFERENCE_PM: [],
    'pm-d4': ['--tta', 'd4'],
}
STAGE1_FIXED = ['--weights', 'none', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu']
PSEUDO_MASK_FIXED = ['--batch_size', '32', '--num_workers', '0', '--device', 'cpu']
STAGE2_FIXED = ['--backbone', 'resnet18', '--resume', 'none', '--batch-size', '8', '--workers', '0',
                '--device', 'cpu', '--Is_GM', 'False']


def get_args_parser():
    parser = argparse.ArgumentParser(description='Choose the reduced recipe on the validation split')
    parser.add_argument('--dataroot', required=True, help='a dataset in the LUAD-HistoSeg layout, with val/')
    parser.add_argument('--dataset', default='luad', choices=('luad', 'bcss'))
    parser.add_argument('--out', required=True, help='folder of the candidates (reused: done ones are kept)')
    parser.add_argument('--jobs', default=2, type=int, help='candidates trained at once, one thread each')
    parser.add_argument('--seeds', default=[0], type=int, nargs='+', metavar='SEED',
                        help='every candidate is trained at each seed; the choice is by the mean')
    parser.add_argument('--stage1', nargs='+', choices=sorted(STAGE1_CANDIDATES), metavar='NAME',
                        default=list(STAGE1_CANDIDATES), help='the stage-1 candidates to run (default: all)')
    parser.add_argument('--pseudo_masks', nargs='+', choices=sorted(PSEUDO_MASK_CANDIDATES), metavar='NAME',
                        default=[REFERENCE_PM], help='how each stage-1 candidate\'s pseudo-masks are made (default: pm, the '
                                             'reference\'s way); several: each stage-1 candidate with each')
    parser.add_argument('--stage2', nargs='+', choices=sorted(STAGE2_CANDIDATES), metavar='NAME',
                        default=list(STAGE2_CANDIDATES), help='the stage-2 candidates to run (default: all)')
    parser.add_argument('--restarts', default=1, type=int, metavar='N',
                        help='stage-1 restarts per seed, the best on val kept, as python -m tool.pipeline '
                             '--stage1_restarts N keeps it (default 1)')
    parser.add_argument('--stage1_budget_s', type=float,
                        help='the longest mean stage-1 training (wall seconds, as measured here) the recipe may '
                             'take; default: no limit')
    parser.add_argument('--stage2_budget_s', type=float, help='the same for stage 2')
    parser.add_argument('--debug', action='store_true', help='show tracebacks of input errors')
    return parser


def run_script(argv, log_path):
    """One stage script with one thread, its output to log_path; StopRun naming the log if it fails."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    with open(log_path, 'w') as out:
        status = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if status:
        raise StopRun(f'{argv[0]} failed (exit status {status}); its output: {log_path}')


def stage1_folder(args, name, seed):
    return os.path.join(args.out, name, f'seed-{seed}')


def variant_name(stage1, pm):
    """The name of a stage-1 candidate whose pseudo-masks are made the `pm` way."""
    return stage1 if pm == REFERENCE_PM else f'{stage1}+{pm}'


def variant_folder(args, stage1, pm, seed):
    """Where the `pm` pseudo-masks of a stage-1 run and what is trained on them go: the run's
    folder itself for the reference's way, else a folder named after `pm` inside it."""
    folder = stage1_folder(args, stage1, seed)
    return folder if pm == REFERENCE_PM else os.path.join(folder, pm)


def pseudo_masks(args, stage1, pm, seed, split):
    """The pseudo-masks of one split (val: scored against val/mask) from one stage-1 run, made the
    `pm` way. 2_generate_PM.py skips the patches that are done, so running it again on a finished
    split costs a start."""
    folder = variant_folder(args, stage1, pm, seed)
    out = os.path.join(folder, f'PM_{split}')
    if not os.path.isfile(os.path.join(out, 'pseudo_mask_metrics.json')):
        os.makedirs(folder, exist_ok=True)
        weights = os.path.join(stage1_folder(args, stage1, seed), f'stage1_checkpoint_trained_on_{args.dataset}.pth')
        run_script(['2_generate_PM.py', '--dataroot', args.dataroot, '--dataset', args.dataset, '--weights', weights,
                    '--split', split, '--out', out, *PSEUDO_MASK_FIXED, *PSEUDO_MASK_CANDIDATES[pm]],
                   os.path.join(folder, f'pm_{split}.log'))
    return out


def stage1_candidate(args, name, seed):
    """Train one stage-1 candidate at one seed (unless done); returns its val CAMs and training time."""
    folder = stage1_folder(args, name, seed)
    os.makedirs(folder, exist_ok=True)
    timing = os.path.join(folder, 'candidate_time.json')
    if not os.path.isfile(timing):
        started = time.perf_counter()
        run_script(['1_train_stage1.py', '--dataroot', args.dataroot, '--dataset', args.dataset, '--save_folder',
                    folder, *STAGE1_FIXED, *STAGE1_CANDIDATES[name], '--seed', str(seed)],
                   os.path.join(folder, 'stage1.log'))
        save_text(json.dumps({'wall_s': round(time.perf_counter() - started)}) + '\n', timing)
    return {'cam_val': read_json(os.path.join(folder, 'stage1_val_metrics.json'))['miou'],
            'wall_s': read_json(timing)['wall_s']}


def pseudo_mask_candidate(args, trained, stage1, pm, seed):
    """The val scores of a trained stage-1 candidate with its pseudo-masks made the `pm` way."""
    pm_val = pseudo_mask_scores(pseudo_masks(args, stage1, pm, seed, 'val'))
    return {**trained[stage1][seed], 'pm_val': pm_val, 'pm_val_weighted': loss_weighted(pm_val)}


def kept_restart(runs, seed, restarts):
    """A candidate's result at `seed`: that of its restart with the best loss-weighted val
    pseudo-masks (the first of equal ones, as the pipeline keeps), with the restart's number and
    seed; runs: {trained seed: result}."""
    trained = [restart_seed(seed, k) for k in range(restarts)]
    k = best_restart([runs[trained_seed]['pm_val_weighted'] for trained_seed in trained])
    return {**runs[trained[k]], 'restart': k, 'trained_seed': trained[k]}


def stage2_candidate(args, folder, name, seed):
    """Train one stage-2 candidate at one seed on the pseudo-masks of the stage-1 run in `folder`
    (unless done); returns its best validation MIoU and that epoch."""
    out = os.path.join(folder, name)
    timing = os.path.join(out, 'candidate_time.json')
    if not os.path.isfile(timing):
        started = time.perf_counter()
        run_script(['3_train_stage2.py', '--dataroot', os.path.join(folder, 'data'), '--dataset', args.dataset,
                    '--savepath', out, *STAGE2_FIXED, *STAGE2_CANDIDATES[name], '--seed', str(seed)],
                   out + '.log')
        save_text(json.dumps({'wall_s': round(time.perf_counter() - started)}) + '\n', timing)
    val = validation_epochs(os.path.join(out, 'metrics.jsonl'))
    best = best_epoch(val)
    return {'val_miou': best['miou'], 'epoch': best['epoch'], 'epochs': len(val), 'wall_s': read_json(timing)['wall_s']}


def stage2_data(args, stage1, pm, seed):
    """In the folder of a stage-1 run's `pm` pseudo-masks: PM_train (those of the training patches)
    and data/, the dataset's splits with train_PM -> ../PM_train (stage 2 reads DATAROOT/train_PM)."""
    pseudo_masks(args, stage1, pm, seed, 'train')
    folder = variant_folder(args, stage1, pm, seed)
    view = os.path.join(folder, 'data')
    if not os.path.isdir(view):
        os.makedirs(view)
        for split in ('train', 'train_gt', 'val', 'test'):
            if os.path.isdir(os.path.join(args.dataroot, split)):
                os.symlink(os.path.abspath(os.path.join(args.dataroot, split)), os.path.join(view, split))
        os.symlink(os.path.join('..', 'PM_train'), os.path.join(view, 'train_PM'))


def run_all(pool, candidate, names, seeds):
    """{name: {seed: result}} of candidate(name, seed) over every pair, --jobs at a time."""
    pairs = [(name, seed) for name in names for seed in seeds]
    results = list(pool.map(lambda pair: candidate(*pair), pairs))
    by_name = {name: {} for name in names}
    for (name, seed), result in zip(pairs, results):
        by_name[name][seed] = result
    return by_name


def mean(runs, key):
    return spread([run[key] for run in runs.values()])[0]


def choose(results, key, wall_budget_s, flag):
    """The candidate with the best mean `key` among those whose mean training time fits the budget
    (the first of equal ones)."""
    affordable = [name for name, runs in results.items() if wall_budget_s is None or mean(runs, 'wall_s') <= wall_budget_s]
    if not affordable:
        raise InputError(f'{flag} {wall_budget_s:g}: no candidate trains within it')
    return max(affordable, key=lambda name: mean(results[name], key))


def score_cells(runs, key):
    """'mean ± sd' of one score over the seeds, or the value alone for one seed."""
    values = [run[key] for run in runs.values()]
    m, sd, _, _ = spread(values)
    return f'{m:.4f} ± {sd:.4f}' if len(values) > 1 else f'{m:.4f}'


def restart_note(run):
    """' (restart k, seed s)' where a seed kept a restart other than its own."""
    return f' (restart {run["restart"]}, seed {run["trained_seed"]})' if run['restart'] else ''


def tables(stage1, stage2, choice, seeds):
    """Markdown: the stage-1 candidates, then the stage-2 candidates (mean ± sd over the seeds,
    then each seed's value of the score chosen by); the chosen ones in bold."""
    bold = lambda name: f'**{name}**' if name in choice.values() else name
    per_seed = ' | '.join(f'seed {s}' for s in seeds)
    weights = ' + '.join(f'{w:g} {layer}' for layer, w in PAPER_LAYERS.items())
    lines = ['| stage 1 | CAM, val | ' + ' | '.join(f'PM_{layer}, val' for layer in PAPER_LAYERS)
             + f' | PM, val ({weights}) | {per_seed} | training wall s |',
             '|---|---:|' + '---:|' * (len(PAPER_LAYERS) + 2 + len(seeds))]
    for name, runs in stage1.items():
        layers = [score_cells({s: {'v': r['pm_val'][layer]} for s, r in runs.items()}, 'v') for layer in PAPER_LAYERS]
        lines.append(f'| {bold(name)} | {score_cells(runs, "cam_val")} | ' + ' | '.join(layers)
                     + f' | {score_cells(runs, "pm_val_weighted")} | '
                     + ' | '.join(f'{runs[s]["pm_val_weighted"]:.4f}' + restart_note(runs[s]) for s in seeds)
                     + f' | {mean(runs, "wall_s"):.0f} |')
    lines += ['', f'| stage 2 on the pseudo-masks of {choice["stage1"]} | val MIoU, best epoch | {per_seed} '
                  f'| best epoch (of) | training wall s |', '|---|---:|' + '---:|' * (len(seeds) + 2)]
    for name, runs in stage2.items():
        epochs = ', '.join(f'{runs[s]["epoch"] + 1}' for s in seeds) + f' ({runs[seeds[0]]["epochs"]})'
        lines.append(f'| {bold(name)} | {score_cells(runs, "val_miou")} | '
                     + ' | '.join(f'{runs[s]["val_miou"]:.4f}' for s in seeds)
                     + f' | {epochs} | {mean(runs, "wall_s"):.0f} |')
    return '\n'.join(lines) + '\n'


def main(args):
    args.dataroot, args.out = os.path.abspath(args.dataroot), os.path.abspath(args.out)
    if not os.path.isdir(os.path.join(args.dataroot, 'val')):
        raise InputError(f'{args.dataroot}: no val/ folder (the recipe is chosen on it)')
    for flag, value in (('--jobs', args.jobs), ('--restarts', args.restarts)):
        if value < 1:
            raise InputError(f'{flag} {value}: must be at least 1')
    os.makedirs(args.out, exist_ok=True)
    trained_seeds = sorted({restart_seed(seed, k) for seed in args.seeds for k in range(args.restarts)})
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = run_all(pool, lambda name, seed: stage1_candidate(args, name, seed), args.stage1, trained_seeds)
        variants = {variant_name(name, pm): (name, pm) for name in args.stage1 for pm in args.pseudo_masks}
        scored = run_all(pool, lambda variant, seed: pseudo_mask_candidate(args, trained, *variants[variant], seed),
                         variants, trained_seeds)
        stage1 = {variant: {seed: kept_restart(runs, seed, args.restarts) for seed in args.seeds}
                  for variant, runs in scored.items()}
        choice = {'stage1': choose(stage1, 'pm_val_weighted', args.stage1_budget_s, '--stage1_budget_s')}
        name, pm = variants[choice['stage1']]
        kept = {seed: run['trained_seed'] for seed, run in stage1[choice['stage1']].items()}
        list(pool.map(lambda seed: stage2_data(args, name, pm, kept[seed]), args.seeds))
        stage2 = run_all(pool, lambda s2, seed: stage2_candidate(args, variant_folder(args, name, pm, kept[seed]),
                                                                 s2, seed), args.stage2, args.seeds)
    choice['stage2'] = choose(stage2, 'val_miou', args.stage2_budget_s, '--stage2_budget_s')
    table = tables(stage1, stage2, choice, args.seeds)
    save_text(table, os.path.join(args.out, 'recipe_search.md'))
    save_text(json.dumps({'dataroot': args.dataroot, 'seeds': args.seeds, 'restarts': args.restarts,
                          'pseudo_masks': args.pseudo_masks,
                          'stage1_budget_s': args.stage1_budget_s,
                          'stage2_budget_s': args.stage2_budget_s, 'stage1': stage1, 'stage2': stage2,
                          'choice': choice}, indent=2) + '\n', os.path.join(args.out, 'recipe_search.json'))
    log.info(table)
    log.info(f'recipe: stage 1 {choice["stage1"]}, stage 2 {choice["stage2"]}')


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
