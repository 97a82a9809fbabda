"""Segment tissue images with a trained stage-2 model: patches, large PNG/TIFF images and whole
slides. See tool/inference/infer.py (or --help)."""
from tool.core.errors import run_cli
from tool.inference.infer import get_args_parser, main

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
