"""One-step incremental and few-shot protocols: end to end on tiny digits, and their pieces."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from refilled.evaluation import episode_accuracies, sample_episodes
from refilled.config import make_config
from refilled.errors import ConfigError
from refilled.methods.applications import LinearProbe, copy_old_model
from refilled.models import create_model
from refilled.networks import Network
from refilled.stats import ci95
from tiny import run_cli, tiny

TINY = tiny(student={"arch": "mlp"},
            stage1={"optim": {"epochs": 0, "batch_size": 20, "m_per_class": 4, "lr": 0.05}})
COMMON = {"method", "role", "dataset", "protocol", "seed", "test_accuracy", "val_accuracy",
          "teacher_test_accuracy", "wall_seconds", "run_dir"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("apps")  # one teacher, trained once, shared by the tests


def write_config(out_dir, name, extra):
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **extra, "out_dir": str(out_dir / "runs")}))
    return path




def test_incremental_end_to_end(out_dir, capsys):
    path = write_config(out_dir, "inc", {"protocol": "incremental", "incremental": {"old_per_class": 4}})
    seen = {}
    for args in (["method=ce"], ["method=finetune"], ["method=linear_probe"], ["method=refilled"],
                 ["method=refilled", "stage1.optim.epochs=1"], ["method=refilled", "incremental.old_per_class=0"]):
        code, res, err = run_cli(capsys, "run", path, *args)
        assert code == 0, err
        assert COMMON | {"test_accuracy_old", "test_accuracy_new"} <= res.keys()
        assert res["protocol"] == "incremental" and res["num_classes"] == 10
        for key in ("test_accuracy", "test_accuracy_old", "test_accuracy_new", "val_accuracy"):
            assert 0.0 <= res[key] <= 1.0
        # all-class accuracy is the test-size-weighted mean of the old and new accuracies
        assert min(res["test_accuracy_old"], res["test_accuracy_new"]) - 1e-9 <= res["test_accuracy"]
        assert res["test_accuracy"] <= max(res["test_accuracy_old"], res["test_accuracy_new"]) + 1e-9
        seen[" ".join(args)] = res
    assert seen["method=ce"]["train_images"] == 5 * 12 + 5 * 4
    assert seen["method=refilled incremental.old_per_class=0"]["train_images"] == 5 * 12
    assert seen["method=ce"]["teacher_test_accuracy"] is None
    assert seen["method=finetune"]["teacher_test_accuracy"] is not None
    assert (Path(seen["method=refilled"]["run_dir"]) / "teacher_centers.pt").is_file()
    # a finished run is returned as it is
    code, again, _ = run_cli(capsys, "run", path, "method=finetune")
    assert code == 0 and again == seen["method=finetune"]
    # finetune needs the old model's architecture
    code, _, err = run_cli(capsys, "run", path, "method=finetune", "student.arch=cnn_small")
    assert code == 2 and "student.arch" in err


def test_fewshot_end_to_end(out_dir, capsys):
    path = write_config(out_dir, "fs", {
        "protocol": "fewshot", "data": {**TINY["data"], "student_offset": 5},
        "fewshot": {"shots": 5, "eval": "episodes", "episodes": 20, "ways": 3, "queries": 4},
    })
    for method in ("ce", "refilled", "teacher_prototypes"):
        code, res, err = run_cli(capsys, "run", path, f"method={method}")
        assert code == 0, err
        assert COMMON | {"test_ci95", "shots"} <= res.keys()
        assert res["protocol"] == "fewshot" and res["train_images"] == 5 * 5
        assert 0.0 <= res["test_accuracy"] <= 1.0 and res["test_ci95"] > 0
    assert res["student_arch"] is None and not (Path(res["run_dir"]) / "model.pt").exists()
    code, res, err = run_cli(capsys, "run", path, "method=ce", "fewshot.eval=classifier", "fewshot.shots=1")
    assert code == 0, err
    assert res["test_ci95"] is None and res["train_images"] == 5
    code, _, err = run_cli(capsys, "run", path, "method=ce", "fewshot.shots=500")
    assert code == 2 and "fewshot.shots=500" in err and "novel class '5'" in err
    code, _, err = run_cli(capsys, "run", path, "data.student_offset=3")
    assert code == 2 and "data.student_offset" in err


def test_finetune_copies_old_rows_and_linear_probe_freezes_the_backbone():
    torch.manual_seed(0)
    old = create_model("cnn_small", 3, 1)
    old.train()(torch.randn(4, 1, 8, 8))  # BN statistics that differ from a fresh model's
    old.eval()
    student = create_model("cnn_small", 5, 1)
    fresh = student.get_classifier().weight.detach().clone()
    copy_old_model(Network(student), Network(old), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    head = student.get_classifier()
    assert torch.equal(head.weight[:3], old.get_classifier().weight)
    assert torch.equal(head.bias[:3], old.get_classifier().bias)
    assert torch.equal(head.weight[3:], fresh[3:])  # new rows keep their fresh initialisation
    for key, value in old.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(student.state_dict()[key], value), key

    probe = LinearProbe(Network(student))
    before = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("head.")}
    opt = torch.optim.SGD(probe.parameters_to_train(), lr=0.5, weight_decay=0.1)
    probe.train()
    for _ in range(3):
        loss = probe.step(torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,)), 0)["ce"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in before.items():  # weights and BN statistics alike
        assert torch.equal(student.state_dict()[key], value), key
    assert not torch.equal(student.get_classifier().weight[:3], old.get_classifier().weight)


def test_method_arch_check_is_a_config_error():
    from refilled.protocols import check_config

    with pytest.raises(ConfigError, match="teacher.arch"):  # before any data is read
        check_config(make_config({"method": "linear_probe", "student": {"arch": "mlp"},
                                  "teacher": {"arch": "cnn_small"}}))
    with pytest.raises(ConfigError, match="protocol: fewshot"):
        check_config(make_config({"method": "teacher_prototypes"}))
    with pytest.raises(ConfigError, match="fewshot.eval"):
        make_config({"protocol": "fewshot", "fewshot": {"eval": "ncm"}})


def test_episode_sampling_is_seeded_disjoint_and_shaped():
    labels = torch.arange(6).repeat_interleave(torch.tensor([9, 12, 10, 30, 9, 11]))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    kw = dict(ways=4, shots=3, queries=5, episodes=50)
    classes, support, query = sample_episodes(labels, **kw, generator=torch.Generator().manual_seed(7))
    assert classes.shape == (50, 4) and support.shape == (50, 4, 3) and query.shape == (50, 4, 5)
    again = sample_episodes(labels, **kw, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip((classes, support, query), again))
    other = sample_episodes(labels, **kw, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(support, other[1])
    for e in range(50):
        assert len(set(classes[e].tolist())) == 4  # distinct classes
        assert (labels[support[e]] == classes[e, :, None]).all()
        assert (labels[query[e]] == classes[e, :, None]).all()
        picked = torch.cat([support[e].flatten(), query[e].flatten()])
        assert len(set(picked.tolist())) == 4 * 8  # no image twice, support and query disjoint
    assert set(classes.flatten().tolist()) == set(range(6))  # every class gets drawn


def test_episode_accuracy_is_perfect_on_separated_embeddings():
    labels = torch.arange(3).repeat_interleave(10)
    emb = torch.nn.functional.one_hot(labels, 3).float() * 5 + 0.1 * torch.randn(30, 3)
    _, support, query = sample_episodes(labels, ways=3, shots=2, queries=4, episodes=10,
                                        generator=torch.Generator().manual_seed(0))
    assert episode_accuracies(emb, support, query) == [1.0] * 10


def test_ci95_against_hand_computation():
    values = [0.5, 0.7, 0.6]
    s = math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2 + 0.0) / 2)  # sample std = 0.1
    assert ci95(values) == pytest.approx(4.302652729911275 * s / math.sqrt(3), rel=1e-9)
    assert ci95(values) == pytest.approx(0.2484138, rel=1e-6)
