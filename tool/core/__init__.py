"""Plumbing that knows nothing of the paper: one-line errors and the scripts' entry (errors),
crash-safe file writing and the cannot-write error (files), checkpoints read with
weights_only=True (checkpoint) and the models built from them (models), devices, autocast and loss
scaling, seeds, run records and the metrics log (runtime), torchrun process groups (distributed),
the MXNet .params reader and weight conversion (mxnet_params, convert_weights). Imports only
network/ and libraries.
"""
