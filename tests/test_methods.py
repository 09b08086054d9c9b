"""Baseline methods, REFILLED's stage-1-only method, ablations and the forward_maps contract."""


import pytest
import torch
import yaml

from refilled.losses import kd_loss
from refilled.config import ABLATIONS, PRESETS, make_config
from refilled.errors import ConfigError
from refilled.methods.baselines import HintonKD, at_pairs, select_shared
from refilled.models import create_model, list_models
from tiny import run_cli, tiny

# The tiny digits setting of test_pipeline.py, one epoch per stage; the teacher is a small CNN
# so that the feature-map methods (AT, FitNet) find maps of equal size.
TINY = tiny(
    data={"student_offset": 2},
    teacher={"arch": "cnn_small", "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
    train={"epochs": 1},
    stage1={"optim": {"epochs": 1, "batch_size": 20, "m_per_class": 4, "lr": 0.05}},
)
METHODS = ["ce", "refilled", "refilled_stage1", "kd", "rkd", "fitnet", "at", "sp", "pkt", "label_smoothing"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(root / "runs")}))
    return path




# ------------------------------------------------------------------ every method end to end


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end(config_file, capsys, method):
    code, res, err = run_cli(capsys, "run", config_file, f"method={method}")
    assert code == 0, err
    assert res["method"] == method and res["protocol"] == "partial_overlap" and res["overlap"] == 3
    assert 0.0 <= res["test_accuracy"] <= 1.0 and 0.0 <= res["val_accuracy"] <= 1.0
    assert (res["teacher"] is None) == (method in ("ce", "label_smoothing"))
    if method == "refilled_stage1":  # evaluated with its NCM classifier
        assert res["test_accuracy"] == res["stage1_ncm_accuracy"]


def test_fitnet_regressor_is_checkpointed_not_saved_in_the_model(config_file, capsys):
    code, res, err = run_cli(capsys, "run", config_file, "method=fitnet")
    assert code == 0, err
    from pathlib import Path

    ckpt = torch.load(Path(res["run_dir"]) / "train.ckpt", weights_only=False)
    assert any(k.startswith("regressor.") for k in ckpt["method"])
    model = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=False)
    assert not any("regressor" in k for k in model["state_dict"])


# ------------------------------------------------------------------ KD and shared classes


def test_kd_on_disjoint_classes_exits_2_with_a_clear_message(config_file, capsys):
    code, _, err = run_cli(capsys, "run", config_file, "method=kd", "data.student_offset=5")
    assert code == 2 and "Traceback" not in err
    assert "classes the teacher knows" in err and "refilled" in err and "rkd" in err


def test_kd_with_a_single_shared_class_is_refused(config_file, capsys):
    code, _, err = run_cli(capsys, "run", config_file, "method=kd", "data.student_offset=4")
    assert code == 2 and "share only one" in err


def test_select_shared_takes_the_aligned_columns():
    s = torch.arange(10.0).reshape(2, 5)
    t = -torch.arange(10.0).reshape(2, 5)
    s_ids, t_ids = torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])
    s_sel, t_sel = select_shared(s, t, s_ids, t_ids)
    assert torch.equal(s_sel, torch.tensor([[0.0, 1, 2], [5, 6, 7]]))
    assert torch.equal(t_sel, torch.tensor([[-2.0, -3, -4], [-7, -8, -9]]))


class _StubTeacher:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x):
        return torch.zeros(len(x), 4), self.logits


class _LinearStudent(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


def test_kd_distils_only_the_shared_classes():
    """Student classes 0-4 = teacher classes 2-6 of 7; the teacher's other columns never count."""
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(6, 5), torch.randn(6, 7)
    y = torch.randint(0, 5, (6,))
    s_ids, t_ids = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])
    method = HintonKD(_LinearStudent(s_logits), _StubTeacher(t_logits), s_ids, t_ids, 4.0, 0.9)
    losses = method.step(torch.zeros(6, 1), y, 0)
    expected = 0.9 * kd_loss(s_logits[:, :3], t_logits[:, 4:], 4.0)
    assert torch.allclose(losses["kd"], expected)
    assert torch.allclose(losses["ce"], 0.1 * torch.nn.functional.cross_entropy(s_logits, y))
    # the teacher's non-shared columns (0-3) and the student's non-shared ones (3, 4) do not matter
    t_other = t_logits.clone()
    t_other[:, :4] += 100 * torch.randn(6, 4)
    method.teacher = _StubTeacher(t_other)
    assert torch.allclose(method.step(torch.zeros(6, 1), y, 0)["kd"], expected)
    grad = torch.autograd.grad(losses["kd"], method.student.logits)[0]
    assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0


# ------------------------------------------------------------------ feature maps


@pytest.mark.parametrize("name", list_models())
def test_forward_maps_contract(name):
    """Stage outputs in order, 4-D with the batch first, resolution never increasing; the last
    one pooled is exactly the embedding of forward_features."""
    small = name.startswith(("cnn", "mlp"))
    chans, size = (1, 8 if name == "mlp" else 28) if small else (3, 32)
    model = create_model(name, num_classes=3, in_chans=chans).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        maps, z = model.forward_maps(x), model.forward_features(x)
    assert isinstance(maps, list) and len(maps) >= 2
    assert all(m.dim() == 4 and m.shape[0] == 2 for m in maps)
    sides = [m.shape[2] * m.shape[3] for m in maps]
    assert sides == sorted(sides, reverse=True)
    assert maps[-1].shape[1] == model.num_features
    torch.testing.assert_close(maps[-1].mean(dim=(2, 3)), z)


def test_at_pairs_maps_of_equal_size():
    def shapes(*hw):
        return [torch.Size([2, 8, h, h]) for h in hw]

    assert at_pairs(shapes(28, 14, 7), shapes(28, 14, 7)) == [(0, 0), (1, 1), (2, 2)]
    assert at_pairs(shapes(32, 16, 8), shapes(112, 56, 28, 14, 7)) == []
    assert at_pairs(shapes(28, 14, 14, 7), shapes(14, 7, 7)) == [(2, 0), (3, 2)]  # last of each size
    assert at_pairs(shapes(1, 1), shapes(1, 1)) == []  # 1x1 maps carry no attention


def test_at_with_an_mlp_teacher_exits_2_naming_the_sizes(config_file, capsys):
    code, _, err = run_cli(capsys, "run", config_file, "method=at", "teacher.arch=mlp")
    assert code == 2 and "equal spatial size" in err and "8x8" in err and "1x1" in err


# ------------------------------------------------------------------ config: baselines and ablations


def test_baseline_defaults_and_validation():
    b = make_config({}).baselines
    assert (b.kd_temperature, b.kd_alpha, b.rkd_distance_weight, b.rkd_angle_weight) == (4.0, 0.9, 25.0, 50.0)
    assert (b.fitnet_weight, b.at_beta, b.sp_gamma, b.pkt_weight, b.label_smoothing) == (
        100.0, 1000.0, 3000.0, 500.0, 0.1)
    for override, key in (("baselines.kd_temperature=0", "baselines.kd_temperature"),
                          ("baselines.at_beta=-1", "baselines.at_beta"),
                          ("baselines.kd_alpha=1.5", "baselines.kd_alpha"),
                          ("baselines.label_smoothing=1", "baselines.label_smoothing"),
                          ("baselines.pkt_wieght=1", "baselines.pkt_wieght")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_config({}, [override])


def test_ablations_resolve_to_their_settings():
    tree = {"method": "refilled", "stage1": {"mode": "tuple", "optim": {"epochs": 7}},
            "stage2": {"centers": "global", "weighting": True}}

    def cfg(name):
        return make_config(tree, [f"ablation={name}"])

    assert cfg("stage1_only").method == "refilled_stage1"
    assert cfg("stage2_only").stage1.optim.epochs == 0  # above the file's 7
    assert cfg("triplet").stage1.mode == "triplet"
    assert cfg("local_centers").stage2.centers == "local"
    assert cfg("no_weighting").stage2.weighting is False
    for preset in ("cvpr", "cvpr_recon", "tpami"):
        c = cfg(preset)
        assert c.method == "refilled" and c.ablation == preset and c.stage2.preset == preset
        for key, value in PRESETS[preset].items():
            section, name = key.split(".")
            assert getattr(getattr(c, section), name) == value, (preset, key)
    # an ablation makes the run REFILLED even when the file says otherwise, and leaves the rest
    c = make_config({**tree, "method": "ce", "train": {"lr": 0.01}}, ["ablation=triplet"])
    assert c.method == "refilled" and c.train.lr == 0.01
    # an ablation does not change anything without it
    assert make_config(tree).stage1.optim.epochs == 7
    assert set(ABLATIONS) >= {"stage1_only", "stage2_only", "triplet", "local_centers", "no_weighting",
                              "cvpr", "cvpr_recon", "tpami"}
    if "random_teacher" in ABLATIONS:
        assert cfg("random_teacher").teacher.init == "random"


def test_unknown_or_contradicted_ablation_is_an_error():
    with pytest.raises(ConfigError, match="'ablation' must be one of .*stage2_only.*triplet"):
        make_config({}, ["ablation=stage3_only"])
    with pytest.raises(ConfigError, match="stage1.optim.epochs=0, but stage1.optim.epochs=5"):
        make_config({}, ["ablation=stage2_only", "stage1.optim.epochs=5"])
    with pytest.raises(ConfigError, match="method=refilled, but method=kd"):
        make_config({}, ["ablation=triplet", "method=kd"])
    # a command-line value equal to the ablation's is fine; other keys may be overridden freely
    assert make_config({}, ["ablation=stage2_only", "stage1.optim.epochs=0", "train.lr=0.2"]).train.lr == 0.2


def test_ablation_run_resumes_from_its_saved_config(config_file, capsys):
    """The saved config of an ablation run rebuilds to the same digest (the run is found again)."""
    args = ("run", config_file, "ablation=stage2_only", "data.student_offset=5")
    code, first, err = run_cli(capsys, *args)
    assert code == 0, err
    assert first["stage1_ncm_accuracy"] is None  # no stage 1
    code, again, err = run_cli(capsys, *args)
    assert code == 0 and again == first


def test_handoff_rescales_the_last_norm_layer_exactly_or_not_at_all():
    import torch.nn as nn

    from refilled.methods.refilled import rescale_embedding
    from refilled.networks import Network
    from refilled.data import Split

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8)
    train = Split(images, torch.arange(40) % 4)
    net = Network(create_model("cnn_small", 4, 1)).eval()
    with torch.no_grad():  # a stage-1-like embedding: tiny norm
        net.module.features[-2].weight.mul_(0.01)
        net.module.features[-2].bias.mul_(0.01)
    from refilled.evaluation import embedding_norm, predict

    before_emb, _ = predict(net, images, "cpu")
    note = rescale_embedding(net, train, None, None)
    assert note["handoff"].startswith("rescaled") and note["handoff_scale"] > 10 and "warning" not in note
    assert embedding_norm(net, images, "cpu") == pytest.approx(8.0, rel=0.02)  # sqrt(64)
    after_emb, _ = predict(net, images, "cpu")
    cos = torch.nn.functional.cosine_similarity(before_emb, after_emb, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)  # no direction moved

    class Residual(nn.Module):  # a sum after the last BN: scaling it is not exact
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x)) + x).mean(dim=(2, 3)))

    res = Network(Residual()).eval()
    res.probe(images[:2].float() / 255)
    state = {k: v.clone() for k, v in res.state_dict().items()}
    note = rescale_embedding(res, train, None, None)
    assert note["handoff"].startswith("none (the embedding is not proportional")
    assert note["warning"].startswith("hand-off not rescaled: the embedding is not proportional")
    assert all(torch.equal(v, state[k]) for k, v in res.state_dict().items())
