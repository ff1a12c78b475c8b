"""Lightning callback: Tune mode for the fit, one line in the Trainer.

>>> from convbn.integrations.lightning import ConvBNTune
>>> trainer = lightning.Trainer(callbacks=[ConvBNTune(freeze_bn=True)])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError(
            "convbn.integrations.lightning needs Lightning: pip install 'convbn[lightning]'"
        ) from e

import convbn

__all__ = ["ConvBNTune"]


class ConvBNTune(Callback):
    """Convert the LightningModule (or some of its sub-modules) with :func:`convbn.tune`
    when fitting starts, and restore it when fitting ends.

    Args:
        freeze_bn: keep the converted BatchNorms in eval mode through ``model.train()``
            (frozen statistics: the fine-tuning setting in which Tune mode helps).
        modules: attribute paths of sub-modules to convert (e.g. ``["backbone"]``);
            default the whole LightningModule.
        example_inputs: passed to :func:`convbn.tune` for forwards torch.fx cannot trace.
        restore_on_end: undo the conversion when fitting ends (default True), so that
            validation after fit, export and checkpoints see the plain model.
    """

    def __init__(
        self,
        freeze_bn: bool = True,
        modules: Sequence[str] | None = None,
        example_inputs=None,
        restore_on_end: bool = True,
    ):
        self.freeze_bn = freeze_bn
        self.modules = list(modules) if modules else None
        self.example_inputs = example_inputs
        self.restore_on_end = restore_on_end
        self.reports: dict[str, convbn.Report] = {}
        self._tuned: list = []

    def _targets(self, pl_module):
        if self.modules is None:
            return {"": pl_module}
        return {name: pl_module.get_submodule(name) for name in self.modules}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._tuned = []
        for name, module in self._targets(pl_module).items():
            convbn.tune(module, self.example_inputs, freeze_bn=self.freeze_bn)
            self.reports[name] = convbn.report(module)
            self._tuned.append(module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.restore_on_end:
            return
        for module in self._tuned:
            # convbn.restore refuses a model that is not converted (any more): the user
            # may have restored it already.
            with contextlib.suppress(ValueError):
                convbn.restore(module)
        self._tuned = []
