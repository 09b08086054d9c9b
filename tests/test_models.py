"""Model zoo: the shared contract for every registered model, parameter counts and name parsing."""

import pytest
import torch
import torch.nn as nn

from refilled.errors import ConfigError
from refilled.models import create_model, list_models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_expected_models():
    expected = {
        "wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1",
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "mobilenet", "mobilenet_1_0", "mobilenet_0_75", "mobilenet_0_5", "mobilenet_0_25",
        "cnn_small", "cnn_medium", "mlp",
    }  # fmt: skip
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_model_contract(name, in_chans):
    torch.manual_seed(0)
    num_classes = 5
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    assert model.num_classes == num_classes
    assert isinstance(model.num_features, int) and model.num_features > 0
    assert isinstance(model.head, nn.Linear)

    # 32 px is enough for every conv net (MobileNet included) and keeps the test fast
    size = min(model.default_input_size, 32)
    x = torch.randn(2, in_chans, size, size)

    model.train()
    z = model.forward_features(x)
    assert z.shape == (2, model.num_features)
    logits = model.forward_head(z)
    assert logits.shape == (2, num_classes)
    out = model(x)
    assert out.shape == (2, num_classes)
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        assert torch.allclose(model.forward_head(model.forward_features(x)), a)

    ref = model.head.weight
    model.reset_classifier(7)
    assert model.num_classes == 7
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.num_features and model.head.out_features == 7
    assert model.head.weight.device == ref.device and model.head.weight.dtype == ref.dtype
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_reset_classifier_keeps_dtype():
    model = create_model("cnn_small", num_classes=10, in_chans=1).to(torch.float64)
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64
    assert torch.count_nonzero(model.head.bias) == 0
    assert model(torch.randn(2, 1, 28, 28, dtype=torch.float64)).shape == (2, 3)


# published counts for 100 classes (e.g. Tian et al., CRD) and this implementation's exact counts
WRN_PARAMS = {
    "wrn_40_2": (2.2e6, 2_255_156),
    "wrn_16_2": (0.70e6, 703_284),
    "wrn_40_1": (0.57e6, 569_780),
    "wrn_16_1": (0.18e6, 180_916),
}


@pytest.mark.parametrize("name", sorted(WRN_PARAMS))
def test_wrn_parameter_counts(name):
    published, exact = WRN_PARAMS[name]
    count = n_params(create_model(name, num_classes=100))
    assert count == pytest.approx(published, rel=0.05)
    assert count == exact


def test_other_parameter_counts():
    assert n_params(create_model("resnet20", num_classes=10)) == pytest.approx(0.27e6, rel=0.05)
    assert n_params(create_model("mobilenet_1_0", num_classes=1000)) == pytest.approx(4.2e6, rel=0.05)
    assert n_params(create_model("cnn_small", num_classes=10, in_chans=1)) == pytest.approx(24e3, rel=0.05)
    assert n_params(create_model("cnn_medium", num_classes=10, in_chans=1)) == pytest.approx(280e3, rel=0.05)


def test_wrn_name_parsing():
    model = create_model("wrn_28_10", num_classes=10)
    assert (model.depth, model.widen_factor) == (28, 10)
    assert model.num_features == 640
    assert len(model.stages[0]) == 4  # (28 - 4) / 6 blocks per stage
    model = create_model("wrn_10_1", num_classes=10, drop_rate=0.0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_drop_rate_kwarg():
    dropouts = [m for m in create_model("wrn_16_1", 10, drop_rate=0.5).modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    assert not any(isinstance(m, nn.Dropout) for m in create_model("wrn_16_1", 10, drop_rate=0.0).modules())


def test_resnet_name_parsing():
    model = create_model("resnet8", num_classes=10)
    assert model.depth == 8 and model.num_features == 64
    assert [len(stage) for stage in model.stages] == [1, 1, 1]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["wrn_15_2", "wrn_4_2", "resnet21", "resnet2"])
def test_invalid_depth_raises(name):
    with pytest.raises(ConfigError, match="depth"):
        create_model(name, num_classes=10)


def test_unknown_name_lists_available_models():
    with pytest.raises(ConfigError) as info:
        create_model("vgg_unknown", num_classes=10)
    message = str(info.value)
    assert "vgg_unknown" in message
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("name", ["wrn_40_2", "wrn_28_10", "resnet20", "resnet8", "mobilenet_0_5", "cnn_small"])
def test_unknown_kwarg_raises(name):
    with pytest.raises(ConfigError, match="bogus_option"):
        create_model(name, num_classes=10, bogus_option=1)


def test_invalid_sizes_raise():
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("cnn_small", num_classes=0)
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("cnn_small", num_classes=10, in_chans=0)
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("mobilenet", num_classes=10, width_mult=0)


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25])
def test_mobilenet_width_multiplier(width):
    name = "mobilenet_" + str(width).replace(".", "_")
    for model in (create_model(name, num_classes=10), create_model("mobilenet", num_classes=10, width_mult=width)):
        assert model.num_features == int(1024 * width)
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, int(1024 * width))


def test_mobilenet_other_input_sizes():
    model = create_model("mobilenet_0_25", num_classes=10).eval()
    with torch.no_grad():
        for size in (32, 84, 224):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_small_cnn_any_input_size():
    model = create_model("cnn_medium", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        for size in (8, 28, 40):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_mlp_input_size_kwarg():
    model = create_model("mlp", num_classes=10, in_chans=1)  # sklearn digits: 1 x 8 x 8
    assert model.default_input_size == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    model = create_model("mlp", num_classes=10, in_chans=1, input_size=28, hidden_dim=64)
    assert model.num_features == 64
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_weight_init():
    model = create_model("resnet20", num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
