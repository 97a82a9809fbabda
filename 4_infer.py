"""Segment tissue images with a trained stage-2 model: patches, large PNG/TIFF images and whole
slides. See tool/infer.py (or --help)."""
from tool.infer import get_args_parser, main
from tool.io import run_cli

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
