"""Bad config files and values: one ConfigError line naming the file or the key (issue 13)."""

import pytest

from refilled.config import ConfigError, load_config, make_config


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"seed: 1\nname: caf\xe9\n", "is not UTF-8 text (byte 0xe9 on line 2)"),
        (b"seed: 1\ntrain:\n  lr: [0.1\n", "line 4, column 1: not valid YAML"),
        (b"train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "line 4, column 3: key 'lr' is given twice (first on line 2)"),
        (b"seed: 1\nseed: 2\n", "line 2, column 1: key 'seed' is given twice (first on line 1)"),
        (b"train: {lr: 1, lr: 2}\n", "key 'lr' is given twice"),
        (b"just text\n", "must hold a mapping of keys to values, got a str"),
        (b"seed: !!python/object/apply:os.getpid []\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, content, expected):
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config file '{path}'") and expected in message and "\n" not in message


def test_config_path_that_is_a_directory_or_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory, not a file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_floats_written_like_1e_3_are_numbers(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: {lr: 1e-3}\n")  # YAML 1.1 reads this as a string
    assert load_config(path).train.lr == pytest.approx(1e-3)


def test_the_same_key_twice_on_the_command_line():
    with pytest.raises(ConfigError, match=r"config key 'train.lr' is given twice on the command line "
                                          r"\('train.lr=1' and 'train.lr=2'\); keep one"):
        load_config(None, ["train.lr=1", "seed=0", "train.lr=2"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lr=[0.1", "override 'train.lr=[0.1', line 1, column 5: not valid YAML"),
        ("train.lr={a: 1", "override 'train.lr={a: 1'"),
        ("name=a: b: c", "not valid YAML"),
        ("name=a: b", "config key 'name' expects a string, got {'a': 'b'}"),
        ("name=!!python/name:os.system", "not valid YAML"),
    ],
)
def test_unreadable_override_values(override, expected):
    with pytest.raises(ConfigError) as info:
        make_config(overrides=[override])
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "1e400"])
@pytest.mark.parametrize("key", ["train.lr", "stage2.lam", "stage1.tau", "baselines.kd_alpha",
                                 "teacher.optim.momentum", "data.test_fraction"])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number, got -?(nan|inf)"):
        make_config(overrides=[f"{key}={value}"])


def test_non_finite_numbers_in_a_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("stage2:\n  tau_teacher: .nan\n")
    with pytest.raises(ConfigError, match="'stage2.tau_teacher' must be a finite number, got nan"):
        load_config(path)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_device_spellings_accepted(device):
    assert make_config(overrides=[f"device={device}"]).device == device  # availability: at run time


@pytest.mark.parametrize("device", ["gpu", "cuda:abc", "cuda:-1", "CPU", "cuda:0:1", "tpu"])
def test_device_spellings_refused(device):
    with pytest.raises(ConfigError, match=r"config key 'device' must be auto, cpu, cuda, cuda:N"):
        make_config(overrides=[f"device={device}"])


@pytest.mark.parametrize("key", ["seed", "teacher.seed", "data.split_seed", "data.class_order_seed",
                                 "data.test_split_seed"])
def test_seeds_are_32_bit_unsigned(key):
    assert make_config(overrides=[f"{key}={2**32 - 1}"])
    for bad in (-1, 2**32, 10**30):
        with pytest.raises(ConfigError, match=rf"config key '{key}' is a seed and must be an integer in "
                                              r"\[0, 4294967295\], got"):
            make_config(overrides=[f"{key}={bad}"])


def test_image_size():
    assert make_config(overrides=["data.image_size=8"]).data.image_size == 8
    assert make_config(overrides=["data.image_size=null"]).data.image_size is None
    for bad in (0, -5, 7, 10**6):
        with pytest.raises(ConfigError, match=r"config key 'data.image_size' is a side in pixels"):
            make_config(overrides=[f"data.image_size={bad}"])
    with pytest.raises(ConfigError, match=r"'data.image_size' expects"):
        make_config(overrides=["data.image_size=32.5"])


@pytest.mark.parametrize("key", ["train.epochs", "train.batch_size", "data.val_per_class",
                                 "fewshot.episodes", "train.milestones"])
def test_integers_beyond_sane_bounds(key):
    value = "[1, 10000000000]" if key == "train.milestones" else "10000000000"
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be at most 2147483647"):
        make_config(overrides=[f"{key}={value}"])


def test_test_split_keys():
    cfg = make_config()
    assert (cfg.data.test_fraction, cfg.data.test_split_seed) == (0.2, 0)
    assert make_config(overrides=["data.test_fraction=0.5"]).data.test_fraction == 0.5
    for bad in ("0", "1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"config key 'data.test_fraction' must be in \(0, 1\)"):
            make_config(overrides=[f"data.test_fraction={bad}"])
