"""The project's compatibility material: what the reference code computes from known weights.

It lives in ../shared/compat beside the repository (CI clones it there). Tests that need it are
skipped, saying why, when it is missing.
"""
import importlib.util
import json
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parents[2] / 'shared' / 'compat'
FIXTURES = COMPAT / 'fixtures'
needs_shared = pytest.mark.skipif(not COMPAT.is_dir(), reason=f'{COMPAT} missing (shared/ is cloned beside the repo)')


def reference_keys(model):
    """{key: shape} of a released checkpoint: 'stage1_resnet38_cls' or 'stage2_deeplab_resnet101_os16'."""
    return json.loads((COMPAT / 'reference_state_dict_keys.json').read_text())[model]


def fixture_state_dict(model):
    """The known weights the fixtures were computed from (shared/compat/fixture_weights.py)."""
    spec = importlib.util.spec_from_file_location('fixture_weights', COMPAT / 'fixture_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.state_dict(model)
