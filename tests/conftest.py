import os

import pytest
import torch
import yaml
from tiny import TINY

# One torch thread, here and in the subprocesses tests start: on a busy 2-core machine two
# threads ran the stage-1 loss 16x slower than one, and timings-based waits time out.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


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
