import pytest
import torch
import yaml
from tiny import TINY


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def config_file(tmp_path):
    """The tiny setting as a YAML file writing its runs under ``tmp_path/runs``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "runs")}))
    return path
