"""Everything but the models (network/), one subpackage per concern. Imports point down this list
(and every subpackage may import network/, which imports nothing from tool/); the one pair side by
side is inference and wsi: 4_infer.py's command (inference/infer.py) hands slides to wsi, which
tiles them with inference's sliding window and image sources.

    pipeline   the whole pipeline in one command, the contact sheet
    inference  4_infer.py: the predictor, sliding window, image sources, overlays
    wsi        whole slides: reader, tissue detection, slide segmentation, mask TIFF, GeoJSON, cohort
    stages     the runners of 1_train_stage1.py, 2_generate_PM.py, 3_train_stage2.py, their shared parts
    method     the paper's concepts: Grad-CAM, the pseudo-mask rule, the multi-layer loss, the gate, metrics
    data       the dataset registry, patch reading, synthetic patches and slides
    core       plumbing: errors, crash-safe files, checkpoints and models from them, runs, distributed
"""
