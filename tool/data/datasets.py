"""The dataset registry: every fact about a dataset, defined here once and read by everything else.

    DATASETS['luad'].class_names        ('TE', 'NEC', 'LYM', 'TAS')
    DATASETS[args.dataset].palette      flat RGB per class index, BACKGROUND's last
    DATASETS['bcss'].mpp                0.25 um per pixel

'luad' is LUAD-HistoSeg, 'bcss' BCSS-WSSS (Han et al. 2022); 'custom' is the user's own data,
labelled by a CSV, drawn and named like LUAD-HistoSeg, at a resolution the user gives (--mpp).
"""
import re
from typing import NamedTuple, Optional

N_CLASS = 4  # tissue classes, indices 0..3, of every dataset here
BACKGROUND = 4  # white non-tissue and glass in masks and predictions; left out of every metric
REFERENCE_PATCH_SIZE = 224  # both released datasets' patches: what the released checkpoints learnt on


TISSUES = ('tumour', 'necrosis', 'lymphocytes', 'stroma')  # the tissue types both datasets label


class Dataset(NamedTuple):
    class_names: tuple  # index -> name
    tissues: tuple  # index -> which of TISSUES the class is
    palette: list  # flat RGB of each class index, then BACKGROUND (white), as PIL's getpalette() lists it
    mpp: Optional[float]  # um per pixel the patches were cut at; None: the user's to give
    # White non-tissue is BACKGROUND in the dataset's labels, so in the pseudo-masks and at
    # inference (air of alveoli and lumens); where False (BCSS-WSSS), white is tissue (fat).
    white_is_background: bool
    label_style: Optional[re.Pattern]  # the patch label in a train file name; None: labels from a CSV
    label_example: str
    released_folder: Optional[str]  # under datasets/, as the authors ship it
    synthetic_folder: Optional[str]  # under datasets/, the embedded synthetic stand-in

    def class_of(self, tissue):
        """The class index of a tissue type ('tumour', 'stroma', ...)."""
        return self.tissues.index(tissue)


LUAD_TISSUES = ('tumour', 'necrosis', 'lymphocytes', 'stroma')
LUAD_PALETTE = [205, 51, 51, 0, 255, 0, 65, 105, 225, 255, 165, 0, 255, 255, 255]

DATASETS = {
    # 10x, about 1 um per pixel; file names end in '[a b c d]'.
    'luad': Dataset(('TE', 'NEC', 'LYM', 'TAS'), LUAD_TISSUES, LUAD_PALETTE, 1.0, True,
                    re.compile(r'[01]( [01]){3}'), "'[a b c d]' (four 0/1 digits separated by spaces)",
                    'LUAD-HistoSeg', 'SYNTH-LUAD'),
    # Its file names say MPP-0.2500; they end in '[abcd]'.
    'bcss': Dataset(('TUM', 'STR', 'LYM', 'NEC'), ('tumour', 'stroma', 'lymphocytes', 'necrosis'),
                    [255, 0, 0, 0, 255, 0, 0, 0, 255, 153, 0, 255, 255, 255, 255], 0.25, False, re.compile(r'[01]{4}'), "'[abcd]' (four 0/1 digits, no spaces)",
                    'BCSS-WSSS', 'SYNTH-BCSS'),
    'custom': Dataset(('TE', 'NEC', 'LYM', 'TAS'), LUAD_TISSUES, LUAD_PALETTE, None, True, None,
                      'labels from a CSV (--labels_csv)', None, None),
}
