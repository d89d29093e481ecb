"""The bug zoo: named, reproducible broken training setups and their healthy twins.

Every setup is tiny (a few thousand to a few hundred thousand parameters),
trains on offline data (scikit-learn's digits or generated data) in seconds on
a CPU, and is seeded.

>>> from tlwidgets import zoo
>>> zoo.names(healthy=True)[:2]
['mlp-digits', 'cnn-bn-digits']
>>> setup = zoo.get("lr-too-high")
>>> setup.expected, setup.twin
(('lr-too-high',), 'mlp-digits')
>>> runner = setup.runner()                 # a tlw.Runner on a fresh build   # doctest: +SKIP
>>> runner.run(**setup.run); runner.findings                                  # doctest: +SKIP
>>> setup.diagnose().codes                  # runner findings + explicit checks # doctest: +SKIP

``zoo.digits`` holds the data and the pretrained backbone used for the
transfer-learning setups (and the tutorial).
"""

from tlwidgets.zoo import broken as _broken  # noqa: F401  (registers the broken setups)
from tlwidgets.zoo import data_bugs as _data_bugs  # noqa: F401  (more forms of the data bugs)
from tlwidgets.zoo import digits
from tlwidgets.zoo import healthy as _healthy  # noqa: F401  (registers the healthy setups)
from tlwidgets.zoo import loops as _loops  # noqa: F401  (registers the own-loop setups)
from tlwidgets.zoo.digits import (
    DigitsBackbone,
    DigitsNet,
    DigitsSplit,
    load_digits_tensors,
    pretrained_backbone,
    split_digits,
)
from tlwidgets.zoo.registry import CHECKS, Diagnosis, Setup, get, names, register, setups

__all__ = [
    "CHECKS",
    "Diagnosis",
    "DigitsBackbone",
    "DigitsNet",
    "DigitsSplit",
    "Setup",
    "digits",
    "get",
    "load_digits_tensors",
    "names",
    "pretrained_backbone",
    "register",
    "setups",
    "split_digits",
]
