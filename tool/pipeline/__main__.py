"""`python -m tool.pipeline`: the whole pipeline in one command (tool/pipeline/runner.py)."""
from tool.core.errors import run_cli
from tool.pipeline.runner import get_args_parser, main

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
