"""The stage runners behind the scripts, torchvision-reference style (argument parser, data,
model, train_one_epoch, evaluate, main): stage1 (1_train_stage1.py), pseudo_masks
(2_generate_PM.py), stage2 (3_train_stage2.py), and what both trainings share (training: the poly
schedule, the seed of each epoch, the resume state, the finite-loss stop). Imports tool.method,
tool.data, tool.core.
"""
