"""`Adapter`: one model seen through one of its functions (its output dict, pre-logits features, expert logits,
`forward_features`), the module the Trainer, `engine.predict` or a composite model runs; optionally with the
backbone frozen in eval mode whatever `train()` says (the second stages of `livt.stages`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # timm's BN layers subclass these


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCHNORMS)]


def pre_logits(model: nn.Module, images: Tensor) -> Tensor:
    """The classifier's input (B, D)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def outputs(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The model-output dict of `images`: logits, features and the head's extras (`livt.models`)."""
    if hasattr(model, "forward_outputs"):
        return model.forward_outputs(images)
    features = pre_logits(model, images)  # (B, D)
    head = model.get_classifier()
    out = head.outputs(features) if hasattr(head, "outputs") else {"logits": head(features)}
    return {"features": features, **out}


def forward_features(model: nn.Module, images: Tensor) -> Tensor:
    """A backbone cut short: its `forward_features` (a ViT's tokens (B, 1 + L, D))."""
    return model.forward_features(images)


class Adapter(nn.Module):
    """`forward(images) -> fn(model, images)`. The model is the attribute `model`, so state-dict keys are
    `model.<the model's keys>`. With `frozen` the model stays in eval mode whatever `train()` says: only
    its head follows it, and with `shift_bn` its BatchNorm layers too."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Tensor], object] = outputs, *,
                 frozen: bool = False, shift_bn: bool = False) -> None:
        super().__init__()
        self.model, self.fn, self.frozen, self.shift_bn = model, fn, frozen, shift_bn

    def train(self, mode: bool = True) -> Adapter:
        if not self.frozen:
            return super().train(mode)
        super().train(False)
        self.training = mode
        self.model.get_classifier().train(mode)
        if self.shift_bn:
            for bn in batchnorms(self.model):
                bn.train(mode)
        return self

    def forward(self, images: Tensor):
        return self.fn(self.model, images)
