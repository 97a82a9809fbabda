"""Stage 1 of WSSS-Tissue: train the CAM classifier with progressive dropout attention, then score
its CAMs on the test split. The logic lives in tool/stages/stage1.py; `--help` lists the flags."""
from tool.core.errors import run_cli
from tool.stages.stage1 import get_args_parser, main

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
