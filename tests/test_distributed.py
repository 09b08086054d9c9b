"""torchrun / DDP on CPU with gloo: the same loss and gradients as one process on the global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from tiny import tiny

from refilled.config import Stage1Config
from refilled.methods import CrossEntropy, RelationMatching
from refilled.models import create_model
from refilled.networks import FrozenTeacher, Network
from refilled.runtime import Dist

WORLD = 2


def models():
    torch.manual_seed(0)
    teacher = FrozenTeacher(Network(create_model("mlp", 6, 1, input_size=8, hidden_dim=24)))
    student = Network(create_model("mlp", 4, 1, input_size=8, hidden_dim=16))
    return teacher, student


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 4


def loader_data():
    from refilled.data import Augment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(48) % 6
    return images, labels, Augment(2, True, degrees=10, scale=0.1, shear=0.2, thickness=0.7, noise=0.05)


def loader_batches(rank, world, sampler=False):
    from refilled.data import ClassBalancedSampler, TensorLoader

    images, labels, augment = loader_data()
    loader = TensorLoader(images, labels, 12, augment=augment, seed=3, rank=rank, world=world,
                          sampler=ClassBalancedSampler(labels, 2, 12, seed=3) if sampler else None)
    loader.set_epoch(1)
    return list(loader)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    # loopback only, and a file rendezvous: no interface guessing, no port to race for
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous",
                                         rank=rank, world_size=WORLD)
    dist = Dist(rank, WORLD)
    x, y = batch()
    xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    results = {}
    cfg = Stage1Config(margin=0.5)
    for name, make in {
        "stage1_global": lambda s, t: RelationMatching(s, t, cfg, dist),
        "stage1_local": lambda s, t: RelationMatching(s, t, cfg, None),
        "ce": lambda s, t: CrossEntropy(s),
    }.items():
        teacher, student = models()
        method = make(student, teacher)
        model = DistributedDataParallel(method)
        losses = model(xs, ys, 0)
        loss = sum(v for k, v in losses.items() if not k.startswith("_"))
        loss.backward()
        results[name] = {"loss": loss.detach(), "grads": grads(student)}
    results["loader"] = loader_batches(rank, WORLD)  # this rank's slices of the global batches
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def single(make, x, y):
    teacher, student = models()
    method = make(student, teacher)
    losses = method(x, y, 0)
    loss = sum(v for k, v in losses.items() if not k.startswith("_"))
    loss.backward()
    return loss.detach(), grads(student)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y = batch()
    cfg = Stage1Config(margin=0.5)

    # global mining: every rank's loss is the one-process loss on the global batch, and the
    # averaged gradients equal the one-process gradients
    loss, want = single(lambda s, t: RelationMatching(s, t, cfg), x, y)
    assert loss.item() > 0
    for r in ranks:
        torch.testing.assert_close(r["stage1_global"]["loss"], loss)
        assert want.keys() == r["stage1_global"]["grads"].keys()
        for name in want:
            torch.testing.assert_close(r["stage1_global"]["grads"][name], want[name], rtol=1e-4, atol=1e-6)
    assert not any("head" in name for name in want)  # the classifier takes no part in stage 1

    # each rank augmented only its own slice, and got what one process gives that slice
    whole = loader_batches(0, 1)
    for r in range(WORLD):
        assert len(ranks[r]["loader"]) == len(whole)
        for (x_r, y_r), (x_w, y_w) in zip(ranks[r]["loader"], whole):
            assert torch.equal(x_r, x_w.chunk(WORLD)[r]) and torch.equal(y_r, y_w.chunk(WORLD)[r])

    # local mining and CE: the gradients are the average of each rank's own-batch gradients
    for key, make in (("stage1_local", lambda s, t: RelationMatching(s, t, cfg)),
                      ("ce", lambda s, t: CrossEntropy(s))):
        parts = [single(make, x.chunk(WORLD)[r], y.chunk(WORLD)[r]) for r in range(WORLD)]
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r][key]["loss"], parts[r][0])
            for name, g in parts[0][1].items():
                mean = (g + parts[1][1][name]) / 2
                torch.testing.assert_close(ranks[r][key]["grads"][name], mean, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_end_to_end_on_cpu(tmp_path):
    tree = tiny(out_dir=str(tmp_path / "runs"), speed={"global_mining": True},
                teacher={"optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", "-m", "refilled.cli", "run", str(config)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "runs").glob("digits-refilled-*/results.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    assert 0 <= res["test_accuracy"] <= 1 and res["stage1_ncm_accuracy"] is not None
    rows = (results[0].parent / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 2


def test_each_rank_augments_only_its_slice_with_the_global_batch_draws():
    for sampler in (False, True):  # without processes: every rank's slices, class-balanced too
        whole = loader_batches(0, 1, sampler)
        for rank in range(WORLD):
            mine = loader_batches(rank, WORLD, sampler)
            assert len(mine) == len(whole)
            for (x, y), (xw, yw) in zip(mine, whole):
                assert torch.equal(x, xw.chunk(WORLD)[rank]) and torch.equal(y, yw.chunk(WORLD)[rank])
