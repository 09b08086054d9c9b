"""Model zoo: every model follows the `ClassifierModel` contract and is built with `create_model`.

>>> from refilled.models import create_model
>>> net = create_model("wrn_40_2", num_classes=100)
>>> z = net.forward_features(x)   # (B, net.num_features) embedding
>>> logits = net.forward_head(z)  # (B, 100)
"""

from refilled.models.registry import ClassifierModel, create_model, list_models, register_model

# importing the architecture modules registers their models
from refilled.models import mobilenet, resnet_cifar, small, wrn  # noqa: E402,F401  isort: skip
from refilled.models.mobilenet import MobileNetV1  # noqa: E402
from refilled.models.resnet_cifar import CifarResNet  # noqa: E402
from refilled.models.small import MLP, SmallCNN  # noqa: E402
from refilled.models.wrn import WideResNet  # noqa: E402

__all__ = [
    "ClassifierModel",
    "CifarResNet",
    "MLP",
    "MobileNetV1",
    "SmallCNN",
    "WideResNet",
    "create_model",
    "list_models",
    "register_model",
]
