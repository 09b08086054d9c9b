"""The GPU path (skipped without a CUDA device): a whole run with bf16, compile and
channels_last; fp32 KL terms under autocast; no host sync in a step; no recompiles in predict."""

import pytest
import torch
import yaml
from tiny import run_cli, tiny

pytestmark = pytest.mark.gpu


def test_tiny_run_on_cuda_with_amp_compile_and_channels_last(tmp_path, capsys):
    path = tmp_path / "gpu.yaml"
    tree = {**tiny(teacher={"arch": "cnn_small"}), "device": "cuda",
            "speed": {"amp": True, "compile": True, "channels_last": True}}
    path.write_text(yaml.safe_dump({**tree, "out_dir": str(tmp_path / "runs")}))
    code, res, err = run_cli(capsys, "run", path)
    assert code == 0, err
    assert 0 <= res["test_accuracy"] <= 1 and res["stage1_ncm_accuracy"] is not None


def _methods():
    from refilled.config import Stage1Config, Stage2Config
    from refilled.methods import LocalClassifierDistillation, RelationMatching
    from refilled.models import create_model
    from refilled.networks import FrozenTeacher, Network

    torch.manual_seed(0)
    teacher = FrozenTeacher(Network(create_model("cnn_small", 7, 1)).cuda())
    student = Network(create_model("cnn_small", 5, 1)).cuda()
    centers = torch.nn.functional.normalize(torch.randn(5, teacher.num_features, device="cuda"), dim=1)
    return (RelationMatching(student, teacher, Stage1Config()),
            LocalClassifierDistillation(student, teacher, Stage2Config(), centers))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(40, 1, 16, 16, generator=g).cuda(), (torch.arange(40) % 5).cuda()


def test_teacher_logits_and_kl_stay_fp32_under_bf16(monkeypatch):
    import refilled.methods.refilled as module

    seen = []
    real = module.local_classifier_loss

    def spy(logits, t_emb, labels, centers, **kw):
        out = real(logits, t_emb, labels, centers, **kw)
        seen.append((logits.dtype, t_emb.dtype, centers.dtype, out.dtype))
        return out

    monkeypatch.setattr(module, "local_classifier_loss", spy)
    _, stage2 = _methods()
    x, y = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stage2.step(x, y, 0)
    assert seen == [(torch.float32,) * 4]


def test_no_host_sync_in_a_refilled_step():
    stage1, stage2 = _methods()
    x, y = _batch()
    for method in (stage1, stage2):
        method.step(x, y, 0)  # warm-up (cuDNN autotuning may sync once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = method.step(x, y, 0)
            total = sum(v for k, v in losses.items() if not k.startswith("_"))
            total.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_predict_of_a_compiled_network_never_recompiles_for_the_last_batch():
    import torch._dynamo

    from refilled.evaluation import predict
    from refilled.models import create_model
    from refilled.networks import Network

    net = Network(create_model("cnn_small", 5, 1)).cuda().eval()
    net.compile_passes()
    images = torch.randint(0, 256, (1100, 1, 16, 16), dtype=torch.uint8)
    predict(net, images[:512], "cuda")  # compiles once for a full batch
    torch._dynamo.config.error_on_recompile = True
    try:
        emb, _ = predict(net, images, "cuda")  # 512 + 512 + 76 (padded)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert emb.shape == (1100, net.num_features)
