"""Whole slides: OpenSlide reading at the model's resolution (slide_reader), tissue detection on a
thumbnail (tissue), one slide end to end (slide_inference) and a cohort of them with resume and
torchrun sharing (cohort), the mask on disk (label_raster) and its outputs: pyramidal TIFF
(mask_tiff), GeoJSON regions (contours, slide_outputs), areas and the stroma area ratio
(slide_outputs). Imports tool.inference's sliding window and image sources, tool.method's
small-region filter (pseudo_mask), tool.data, tool.core.
"""
