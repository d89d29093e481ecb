"""Callbacks for the frameworks people already train with (DESIGN section 9).

- :mod:`tlwidgets.integrations.lightning`: ``DebugCallback`` for PyTorch Lightning
  (``lightning.pytorch`` and ``pytorch_lightning``), extra ``tlwidgets[lightning]``;
- :mod:`tlwidgets.integrations.transformers`: ``DebugCallback`` for the Hugging Face
  ``Trainer``, extra ``tlwidgets[transformers]``.

Each submodule imports its framework when it is imported; this package imports
neither, and ``import tlwidgets`` does not import this package.
:func:`fit_in_background` runs ``trainer.fit``/``trainer.train`` in a thread so a
dashboard's controls act during the fit.
"""

from tlwidgets.integrations._base import BackgroundFit, fit_in_background

__all__ = ["BackgroundFit", "fit_in_background"]
