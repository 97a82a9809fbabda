"""Pseudo-masks of the training patches: Grad-CAM of the stage-1 classifier at layers b4_5, b5_2
and bn7. The logic lives in tool/stages/pseudo_masks.py; `--help` lists the flags."""
from tool.core.errors import run_cli
from tool.stages.pseudo_masks import get_args_parser, main

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
