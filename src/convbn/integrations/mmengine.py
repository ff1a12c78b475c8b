"""MMEngine hook: Tune mode from a config.

In a config::

    custom_imports = dict(imports=["convbn.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="ConvBNTuneHook", modules=["backbone"], freeze_bn=True)]

This replaces MMEngine's own ``efficient_conv_bn_eval = ["backbone"]`` key, with
convbn's conversion (any model, FrozenBatchNorm, ConvTranspose, Linear, no w' kept).
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper
    from mmengine.registry import HOOKS
except ImportError as e:
    raise ImportError(
        "convbn.integrations.mmengine needs MMEngine: pip install 'convbn[mmengine]'"
    ) from e

import convbn

__all__ = ["ConvBNTuneHook"]


@HOOKS.register_module()
class ConvBNTuneHook(Hook):
    """Convert ``modules`` of the runner's model with :func:`convbn.tune` before training.

    Args:
        modules: attribute paths of sub-modules (e.g. ``["backbone"]``); default the
            whole model.
        freeze_bn: keep converted BatchNorms in eval mode through ``model.train()``
            (MMDetection's ``norm_eval=True``).
    """

    priority = "VERY_HIGH"

    def __init__(self, modules: Sequence[str] | None = None, freeze_bn: bool = True):
        self.modules = list(modules) if modules else None
        self.freeze_bn = freeze_bn

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        targets = (
            [model] if self.modules is None else [model.get_submodule(m) for m in self.modules]
        )
        for module in targets:
            convbn.tune(module, freeze_bn=self.freeze_bn)
            runner.logger.info(str(convbn.report(module)))
