"""convbn: Tune-mode ConvBN blocks for PyTorch.

``convbn.tune(model)`` makes every producer -> frozen-BatchNorm pair compute as
one convolution with a folded weight: the outputs and gradients of Eval mode,
with the memory and speed of a model whose BatchNorms have been folded away.

Public API:

- :func:`tune`, :func:`restore`, :func:`report`, :func:`set_mode`: convert a model
  in place, undo it, see what was converted, switch modes;
- :func:`fuse`: Deploy mode (BN folded into new producer parameters) for export;
- :mod:`convbn.functional`: ``fold`` and ``tune_forward`` for one pair.
"""

from convbn import functional
from convbn._model.convert import Report, fuse, report, restore, set_mode, tune

__all__ = ["tune", "restore", "report", "set_mode", "fuse", "Report", "functional"]
__version__ = "0.1.0"
