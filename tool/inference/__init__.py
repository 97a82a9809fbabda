"""Inference on new images with released or trained checkpoints (4_infer.py): the predictor, the
command line and folder/large-image handling (infer), overlapping tiles blended strip by strip
(sliding_window), PNG/TIFF/slide pixel sources (image_source), the reference's overlay (overlay).
Whole slides are handed to tool.wsi. Imports tool.wsi (for slides), tool.method, tool.data,
tool.core.
"""
