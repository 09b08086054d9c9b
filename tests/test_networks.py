"""Any nn.Module through refilled.Network: embedding hooks, classifier, statistics, maps."""

import copy

import pytest
import torch
import torch.nn as nn

from refilled.errors import ConfigError
from refilled.models import create_model
from refilled.networks import Network, pool


def sequential(classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, classes))


class WithFc(nn.Module):
    """A student whose classifier is an attribute ``fc`` (torchvision style)."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.layer = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 10, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(10, classes)

    def forward(self, x):
        return self.fc(self.layer(self.conv(x)).mean(dim=(2, 3)))


def x_batch(n=5):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_default_embedding_is_the_input_of_the_last_linear():
    torch.manual_seed(0)
    seq = sequential()
    net = Network(seq)
    x = x_batch()
    z, logits = net.features_and_logits(x)
    assert torch.equal(z, seq[:-1](x)) and torch.equal(logits, seq(x))
    assert torch.equal(net(x), seq(x)) and torch.equal(net.forward_features(x), seq[:-1](x))
    assert net.num_features == 8 and net.num_classes == 3 and net.classifier is seq[5]
    assert torch.allclose(net.forward_head(z), logits)


def test_named_embedding_is_pooled_and_fc_is_the_classifier():
    torch.manual_seed(0)
    model = WithFc()
    net = Network(model, embedding="layer")
    x = x_batch()
    z, logits = net.features_and_logits(x)
    assert torch.allclose(z, model.layer(model.conv(x)).mean(dim=(2, 3)))
    assert torch.equal(logits, model(x))
    assert net.classifier is model.fc
    net.probe(x)
    assert net.num_features == 10


def test_reset_classifier_replaces_fc_and_keeps_the_hook():
    torch.manual_seed(0)
    model = WithFc(classes=4)
    net = Network(model)
    old = model.fc
    net.reset_classifier(7)
    assert model.fc is not old and isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    x = x_batch()
    z, logits = net.features_and_logits(x)
    assert logits.shape == (5, 7)
    assert torch.allclose(z, model.layer(model.conv(x)).mean(dim=(2, 3)))
    assert net.num_classes == 7


def test_output_embedding_has_no_logits_and_forward_features_is_pooled():
    body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())
    net = Network(body, embedding="output")
    x = x_batch()
    z, logits = net.features_and_logits(x)
    assert logits is None and not net.has_logits and torch.allclose(z, body(x).mean(dim=(2, 3)))

    class TimmLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Conv2d(1, 5, 3), nn.Linear(5, 2)

        def forward_features(self, x):
            return self.body(x)  # unpooled, like timm's CNNs

        def forward_head(self, f):
            return self.head(f.mean(dim=(2, 3)))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    m = TimmLike()
    net = Network(m, embedding="forward_features")
    z, logits = net.features_and_logits(x)
    assert torch.allclose(z, m.body(x).mean(dim=(2, 3))) and torch.allclose(logits, m(x))


def test_zoo_model_goes_through_its_own_passes_with_its_statistics():
    torch.manual_seed(0)
    model = create_model("cnn_small", 3, 1)
    net = Network(model, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(4, 1, 12, 12)
    assert net.zoo
    z, logits = net.features_and_logits(x)
    normed = (x - 0.5) / 0.25
    assert torch.equal(z, model.forward_features(normed))
    assert torch.equal(logits, model.forward_head(model.forward_features(normed)))


def test_named_maps_and_token_pooling():
    model = WithFc()
    net = Network(model, maps=["conv", "layer"])
    maps, logits = net.maps_and_logits(x_batch())
    assert [m.shape[1] for m in maps] == [6, 10] and torch.equal(logits, model(x_batch()))
    assert torch.equal(pool(torch.ones(2, 3, 5)), torch.ones(2, 5))
    with pytest.raises(ConfigError, match="student.maps"):
        Network(WithFc(), role="student").maps_and_logits(x_batch())


def test_deepcopy_hooks_write_to_the_copy():
    torch.manual_seed(0)
    net = Network(sequential())
    twin = copy.deepcopy(net)
    with torch.no_grad():
        net.module[3].weight.mul_(2.0)  # change the original only
    x = x_batch()
    assert torch.equal(twin.forward_features(x), twin.module[:-1](x))
    assert not torch.equal(twin.forward_features(x), net.forward_features(x))


def test_bad_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="teacher.embedding: the teacher has no submodule 'layer9'"):
        Network(WithFc(), embedding="layer9", role="teacher")
    with pytest.raises(ConfigError, match="no nn.Linear classifier"):
        Network(nn.Sequential(nn.Conv2d(1, 2, 3)), role="teacher")
    with pytest.raises(ConfigError, match="go together"):
        Network(sequential(), mean=[0.5])
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        Network(lambda x: x)
