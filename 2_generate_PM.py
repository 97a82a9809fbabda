"""Pseudo-masks of the training patches: Grad-CAM of the stage-1 classifier at layers b4_5, b5_2
and bn7. The logic lives in tool/generate_pm.py; `--help` lists the flags."""
from tool.generate_pm import get_args_parser, main
from tool.io import run_cli

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
