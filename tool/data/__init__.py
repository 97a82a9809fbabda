"""Data: the registry of dataset facts (datasets: classes, palettes, background, resolution,
white rule, folders; defined there once), reading and checking patches, labels and masks with
augmentation (patches), and the embedded synthetic stand-ins with known truth: patches (synth,
`python -m tool.data.synth`) and whole slides (synth_slide, `python -m tool.data.synth_slide`).
Imports tool.core.
"""
