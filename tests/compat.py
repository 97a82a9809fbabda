"""The project's compatibility material: what the reference code computes from known weights.

It lives in tests/fixtures/ (where each file came from: tests/fixtures/SOURCES.md). Every test
that reads it runs on a fresh clone: a missing fixture is a failing test, never a skipped one.
"""
import importlib.util
import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


def reference_keys(model):
    """{key: shape} of a released checkpoint: 'stage1_resnet38_cls' or 'stage2_deeplab_resnet101_os16'."""
    return json.loads((FIXTURES / 'reference_state_dict_keys.json').read_text())[model]


def fixture_state_dict(model):
    """The known weights the fixtures were computed from (tests/fixtures/fixture_weights.py)."""
    spec = importlib.util.spec_from_file_location('fixture_weights', FIXTURES / 'fixture_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.state_dict(model)
