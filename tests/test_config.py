import pytest

from refilled.config import Config, ConfigError, dump_yaml, load_config, make_config, parse_override


def test_defaults_are_the_tpami_preset_and_spec_values():
    cfg = make_config()
    assert cfg.method == "refilled"
    assert (cfg.stage1.tau, cfg.stage1.margin, cfg.stage1.scale, cfg.stage1.mode) == (4.0, 0.2, 1000.0, "tuple")
    s2 = cfg.stage2
    assert (s2.tau_teacher, s2.tau_student, s2.lam, s2.weighting, s2.centers) == (1.0, 1.0, 1.0, True, "global")
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay) == (0.1, 0.9, True, 5e-4)


def test_overrides_yaml_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain: {lr: 0.05, milestones: [1, 2]}\nstudent: {kwargs: {drop_rate: 0.1}}\n")
    cfg = load_config(path, ["train.epochs=7", "stage2.lam=1e-3", "data.root=null", "train.lr=1"])
    assert cfg.seed == 3 and cfg.train.epochs == 7 and cfg.train.milestones == (1, 2)
    assert cfg.stage2.lam == pytest.approx(1e-3) and isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.student.kwargs == {"drop_rate": 0.1}
    # nested defaults that differ from the class default survive a partial section
    assert load_config(path).teacher.optim.epochs == 5
    with pytest.raises(Exception):
        cfg.seed = 4  # frozen


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lrr=0.1", r"unknown config key 'train.lrr'; did you mean 'train.lr'"),
        ("sed=1", r"unknown config key 'sed'; did you mean 'seed'"),
        ("seed=abc", r"'seed' expects an integer"),
        ("train.nesterov=3", r"'train.nesterov' expects true or false"),
        ("stage1.tau=0", r"temperature and must be > 0"),
        ("stage2.lam=-1", r"weight and must be >= 0"),
        ("stage2.preset=icml", r"'stage2.preset' must be one of"),
        ("train.batch_size=50", None),
        ("train.m_per_class=7", r"multiple of train.m_per_class"),
        ("seed", r"not of the form key=value"),
        ("train=3", r"is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    if match is None:
        make_config(overrides=[override])
        return
    with pytest.raises(ConfigError, match=match):
        make_config(overrides=[override])


def test_presets_fill_only_what_the_user_left_unset():
    cfg = make_config({"stage2": {"preset": "cvpr_recon"}})
    assert (cfg.stage2.tau_teacher, cfg.stage2.tau_student, cfg.stage2.lam) == (2.0, 2.0, 100.0)
    assert cfg.stage2.weighting is False
    cfg = make_config({"stage2": {"preset": "cvpr", "lam": 5.0}})
    assert cfg.stage2.lam == 5.0 and cfg.stage2.centers == "local" and cfg.stage2.lam_decay == 0.05
    cfg = make_config(overrides=["stage2.preset=cvpr", "stage1.mode=tuple"])
    assert cfg.stage1.mode == "tuple"


def test_dump_and_reload_round_trip(tmp_path):
    cfg = make_config(overrides=["train.milestones=[3,4]", "data.train_per_class=20", "stage2.preset=tpami"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert isinstance(cfg, Config)


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=x=y") == ("a", "x=y")


def test_every_shipped_config_loads():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        cfg = load_config(path)
        if cfg.data.name == "glyphs":  # the study's three regimes share one teacher window
            assert cfg.data.teacher_classes == 139 and cfg.teacher.arch == "cnn_medium"
