"""The paper's concepts, each in one module: Grad-CAM at the three depths (gradcam), the
pseudo-mask rule and the white background with its small-region filter (pseudo_mask), the
multi-layer pseudo-supervision loss (losses), the classification gate of stage-2 testing (gate),
MIoU / FwIoU and the confusion matrix (metrics). Progressive dropout attention is part of the
model: network/pda.py. Imports tool.data and tool.core.
"""
