"""The recipe search (tool/pipeline/choose_recipe.py) with tiny candidates: it chooses on val
scores only (mean over seeds, within the time budgets), reports what the stages wrote, and does not
retrain candidates that are done."""
import json
import os
import shutil

import pytest

from tool.core.errors import InputError, run_cli
from tool.data.synth import write_dataset
from tool.method.paper_layers import PAPER_LAYERS
from tool.pipeline import choose_recipe, runner
from tool.stages import pseudo_masks, stage1, stage2

TINY_STAGE1 = {'a': ['--width', '0.0625', '--lr', '0.01', '--max_epoches', '1'],
               'b': ['--width', '0.0625', '--lr', '0.002', '--max_epoches', '2']}
TINY_STAGE2 = {'s': ['--width', '0.25', '--lr', '0.01', '--epochs', '2']}
SEEDS = (0, 1)
CHOSEN = ('w16-lr01-e20-pda12-d05', 'pm-d4', 's2-w25-lr03-e10')  # the reduced recipe's candidates
# the real candidates, kept before the search fixture replaces them with tiny ones for the module
CANDIDATES = (choose_recipe.STAGE1_CANDIDATES, choose_recipe.PSEUDO_MASK_CANDIDATES, choose_recipe.STAGE2_CANDIDATES)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def tiny_candidates():
    patch = pytest.MonkeyPatch()
    patch.setattr(choose_recipe, 'STAGE1_CANDIDATES', TINY_STAGE1)
    patch.setattr(choose_recipe, 'STAGE2_CANDIDATES', TINY_STAGE2)
    return patch


@pytest.fixture(scope='module')
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp('recipe')
    write_dataset(str(root / 'data'), 'luad', 32, {'train': 16, 'val': 4, 'test': 4}, seed=1)
    patch = tiny_candidates()
    args = choose_recipe.get_args_parser().parse_args(
        ['--dataroot', str(root / 'data'), '--out', str(root / 'out'), '--seeds', *map(str, SEEDS),
         '--stage1', *TINY_STAGE1, '--stage2', *TINY_STAGE2])
    assert run_cli(choose_recipe.main, args) is None
    yield root, args
    patch.undo()


@pytest.mark.slow
def test_search_chooses_on_the_val_pseudo_masks_and_reports_val_scores_only(search):
    root, _ = search
    out = root / 'out'
    record = read_json(out / 'recipe_search.json')
    weighted = {}
    for name in TINY_STAGE1:
        for seed in SEEDS:
            folder = out / name / f'seed-{seed}'
            cams = read_json(folder / 'stage1_val_metrics.json')
            layers = read_json(folder / 'PM_val' / 'pseudo_mask_metrics.json')['layers']
            scores = record['stage1'][name][str(seed)]
            assert scores['cam_val'] == cams['miou'] and cams['split'] == 'val'
            assert read_json(folder / 'stage1_args.json')['args']['seed'] == seed
            assert scores['pm_val'] == {layer: layers[layer]['miou'] for layer in PAPER_LAYERS}
            assert scores['pm_val_weighted'] == pytest.approx(
                0.2 * layers['b4_5']['miou'] + 0.2 * layers['b5_2']['miou'] + 0.6 * layers['bn7']['miou'])
            assert scores['wall_s'] == read_json(folder / 'candidate_time.json')['wall_s'] >= 1
        weighted[name] = sum(record['stage1'][name][str(s)]['pm_val_weighted'] for s in SEEDS) / len(SEEDS)
    chosen = max(TINY_STAGE1, key=weighted.get)  # the best mean over the seeds
    assert record['choice'] == {'stage1': chosen, 'stage2': 's'}
    # only the chosen candidate made pseudo-masks of the training patches, at each seed; stage 2 read them
    assert sorted(p.relative_to(out).as_posix() for p in out.glob('*/seed-*/PM_train')) == \
        [f'{chosen}/seed-{s}/PM_train' for s in SEEDS]
    for seed in SEEDS:
        folder = out / chosen / f'seed-{seed}'
        stage2_args = read_json(folder / 's' / 'stage2_run_args.json')['args']
        assert stage2_args['dataroot'] == str(folder / 'data') and stage2_args['width'] == 0.25
        assert stage2_args['seed'] == seed
        assert os.path.realpath(folder / 'data' / 'train_PM') == str(folder / 'PM_train')
        with open(folder / 's' / 'metrics.jsonl') as f:
            val = [r for r in map(json.loads, f) if r.get('split') == 'val']
        best = max(val, key=lambda r: r['miou'])
        wall_s = read_json(folder / 's' / 'candidate_time.json')['wall_s']
        assert record['stage2']['s'][str(seed)] == {'val_miou': best['miou'], 'epoch': best['epoch'], 'epochs': 2,
                                                    'wall_s': wall_s}
    # the tables: mean ± sd and each seed, the chosen candidate in bold, no test score anywhere
    table = (out / 'recipe_search.md').read_text()
    runs = record['stage1'][chosen]
    cams = [runs[str(s)]['cam_val'] for s in SEEDS]
    sd = abs(cams[0] - cams[1]) / 2 ** 0.5
    assert f'| **{chosen}** | {sum(cams) / 2:.4f} ± {sd:.4f} |' in table
    assert ' | '.join(f'{runs[str(s)]["pm_val_weighted"]:.4f}' for s in SEEDS) in table
    assert '| **s** |' in table and 'test' not in table
    assert set(record) == {'dataroot', 'seeds', 'restarts', 'pseudo_masks', 'stage1_budget_s', 'stage2_budget_s', 'stage1', 'stage2',
                           'choice'}


@pytest.mark.slow
def test_search_resumes_without_training_again(search):
    root, args = search
    trained = sorted((root / 'out').glob('*/seed-*/stage1_checkpoint_trained_on_luad.pth')) + \
        sorted((root / 'out').glob('*/seed-*/s/metrics.jsonl'))
    before = [(p, p.stat().st_mtime_ns) for p in trained]
    assert len(before) == len(TINY_STAGE1) * len(SEEDS) + len(SEEDS)
    patch = tiny_candidates()
    patch.setattr(choose_recipe, 'run_script', lambda *a: pytest.fail(f'ran {a[0][0]} again'))
    try:
        choose_recipe.main(args)
    finally:
        patch.undo()
    assert [(p, p.stat().st_mtime_ns) for p in trained] == before


@pytest.mark.slow
def test_with_restarts_a_seed_keeps_its_best_restart_and_stage_2_trains_on_it(search):
    root, _ = search
    out = root / 'restarts'
    patch = tiny_candidates()
    try:
        args = choose_recipe.get_args_parser().parse_args(
            ['--dataroot', str(root / 'data'), '--out', str(out), '--seeds', '0', '--restarts', '2',
             '--stage1', 'a', '--stage2', 's'])
        assert run_cli(choose_recipe.main, args) is None
    finally:
        patch.undo()
    record = read_json(out / 'recipe_search.json')
    restarts = {seed: read_json(out / 'a' / f'seed-{seed}' / 'PM_val' / 'pseudo_mask_metrics.json')['layers']
                for seed in (0, 1000)}
    weighted = {seed: 0.2 * layers['b4_5']['miou'] + 0.2 * layers['b5_2']['miou'] + 0.6 * layers['bn7']['miou']
                for seed, layers in restarts.items()}
    kept = 0 if weighted[0] >= weighted[1000] else 1000
    run = record['stage1']['a']['0']
    assert (run['trained_seed'], run['restart']) == (kept, kept // 1000)
    assert run['pm_val_weighted'] == pytest.approx(weighted[kept])
    # stage 2 read the kept restart's pseudo-masks of the training patches, at the run's seed
    assert sorted(p.relative_to(out).as_posix() for p in out.glob('a/seed-*/PM_train')) == [f'a/seed-{kept}/PM_train']
    assert read_json(out / 'a' / f'seed-{kept}' / 's' / 'stage2_run_args.json')['args']['seed'] == 0
    assert record['restarts'] == 2


@pytest.mark.slow
def test_pseudo_mask_candidates_share_the_stage_1_runs(search, tmp_path):
    """--pseudo_masks pm pm-d4: each stage-1 run gets both kinds of pseudo-masks, the d4 ones in a
    folder of their own; nothing is trained again, and stage 2 trains on the chosen kind."""
    root, _ = search
    shutil.copytree(root / 'out' / 'a', tmp_path / 'a', symlinks=True)
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / 'a').glob('seed-*/stage1_checkpoint_trained_on_luad.pth')}
    patch = tiny_candidates()
    run_script = choose_recipe.run_script
    patch.setattr(choose_recipe, 'run_script', lambda argv, log_path: pytest.fail('stage 1 trained again')
                  if argv[0] == '1_train_stage1.py' else run_script(argv, log_path))
    try:
        args = choose_recipe.get_args_parser().parse_args(
            ['--dataroot', str(root / 'data'), '--out', str(tmp_path), '--seeds', *map(str, SEEDS), '--stage1', 'a',
             '--pseudo_masks', 'pm', 'pm-d4', '--stage2', 's'])
        assert run_cli(choose_recipe.main, args) is None
    finally:
        patch.undo()
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    record, first = read_json(tmp_path / 'recipe_search.json'), read_json(root / 'out' / 'recipe_search.json')
    assert list(record['stage1']) == ['a', 'a+pm-d4'] and record['pseudo_masks'] == ['pm', 'pm-d4']
    assert record['stage1']['a'] == first['stage1']['a']  # the reference's way: the same masks, reused
    for seed in SEEDS:
        folder = tmp_path / 'a' / f'seed-{seed}' / 'pm-d4'
        d4 = record['stage1']['a+pm-d4'][str(seed)]
        layers = read_json(folder / 'PM_val' / 'pseudo_mask_metrics.json')['layers']
        assert d4['pm_val'] == {layer: layers[layer]['miou'] for layer in PAPER_LAYERS}
        assert (d4['cam_val'], d4['wall_s']) == (first['stage1']['a'][str(seed)]['cam_val'],
                                                first['stage1']['a'][str(seed)]['wall_s'])
        assert read_json(folder / 'PM_val' / 'generate_pm_args.json')['args']['tta'] == 'd4'
    chosen = record['choice']['stage1']
    for seed in SEEDS:
        folder = tmp_path / 'a' / f'seed-{seed}' / ('pm-d4' if chosen == 'a+pm-d4' else '')
        assert read_json(folder / 's' / 'stage2_run_args.json')['args']['dataroot'] == str(folder / 'data')
        assert os.path.realpath(folder / 'data' / 'train_PM') == str(folder / 'PM_train')
    assert '| a+pm-d4 |' in (tmp_path / 'recipe_search.md').read_text().replace('**', '')


def test_a_seed_keeps_its_best_restart_the_first_of_equal_ones():
    runs = {0: {'pm_val_weighted': 0.7}, 1000: {'pm_val_weighted': 0.8}, 2000: {'pm_val_weighted': 0.8},
            1: {'pm_val_weighted': 0.9}, 1001: {'pm_val_weighted': 0.5}}
    assert choose_recipe.kept_restart(runs, 0, 3) == {'pm_val_weighted': 0.8, 'restart': 1, 'trained_seed': 1000}
    assert choose_recipe.kept_restart(runs, 1, 2) == {'pm_val_weighted': 0.9, 'restart': 0, 'trained_seed': 1}
    assert choose_recipe.kept_restart(runs, 0, 1)['trained_seed'] == 0
    assert choose_recipe.restart_note(choose_recipe.kept_restart(runs, 0, 3)) == ' (restart 1, seed 1000)'


def test_choice_is_the_best_mean_within_the_time_budget():
    runs = lambda score, wall: {0: {'v': score, 'wall_s': wall}, 1: {'v': score + 0.02, 'wall_s': wall + 10}}
    results = {'slow': runs(0.9, 700), 'fast': runs(0.8, 200), 'faster': runs(0.7, 100)}
    assert choose_recipe.choose(results, 'v', None, '--stage1_budget_s') == 'slow'
    # the budget applies to the mean time over the seeds (fast: 205 s)
    assert choose_recipe.choose(results, 'v', 205, '--stage2_budget_s') == 'fast'
    assert choose_recipe.choose(results, 'v', 204, '--stage2_budget_s') == 'faster'
    with pytest.raises(InputError, match='--stage1_budget_s 50: no candidate trains within it'):
        choose_recipe.choose(results, 'v', 50, '--stage1_budget_s')


def test_search_refuses_fewer_than_one_restart(tmp_path):
    os.makedirs(tmp_path / 'data' / 'val')
    args = choose_recipe.get_args_parser().parse_args(
        ['--dataroot', str(tmp_path / 'data'), '--out', str(tmp_path / 'out'), '--restarts', '0'])
    with pytest.raises(InputError, match='--restarts 0: must be at least 1'):
        choose_recipe.main(args)


def test_search_needs_a_val_split(tmp_path):
    os.makedirs(tmp_path / 'data' / 'train')
    args = choose_recipe.get_args_parser().parse_args(['--dataroot', str(tmp_path / 'data'), '--out', str(tmp_path)])
    with pytest.raises(InputError, match='no val/ folder'):
        choose_recipe.main(args)


def test_the_reduced_recipe_runs_the_chosen_candidates(tmp_path):
    """On the embedded data, `--config reduced` trains exactly what the search chose (docs/results.md,
    "Choosing the recipe"): the same parsed arguments in each stage, but for the gate, which the
    search leaves off since it does not change training."""
    reduced = runner.CONFIGS['reduced']
    for i in range(reduced['synthetic']['train']):
        (tmp_path / f'p{i}.png').touch()
    length = runner.training_length(reduced, str(tmp_path))
    for stage, parser, chosen, fixed in (
            ('stage1', stage1.get_args_parser(), CANDIDATES[0][CHOSEN[0]], choose_recipe.STAGE1_FIXED),
            ('pseudo_masks', pseudo_masks.get_args_parser(), CANDIDATES[1][CHOSEN[1]], choose_recipe.PSEUDO_MASK_FIXED),
            ('stage2', stage2.get_args_parser(), CANDIDATES[2][CHOSEN[2]], choose_recipe.STAGE2_FIXED)):
        pipeline = vars(parser.parse_args([*reduced[stage], *length.get(stage, [])]))
        search = vars(parser.parse_args([*fixed, *chosen]))
        for parsed in (pipeline, search):
            parsed.pop('Is_GM', None)
        assert pipeline == search, stage
