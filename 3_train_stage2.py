"""Stage 2 of WSSS-Tissue: train DeepLabV3+ on the multi-layer pseudo-masks, test with the gate.
See tool/stages/stage2.py (or --help)."""
from tool.core.errors import run_cli
from tool.stages.stage2 import get_args_parser, main

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
