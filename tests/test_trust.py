"""A Python API you can trust (issue 20): every bad input is one line naming the keyword, of a
class that is a ValueError, before any optimizer step, with the user's modules as they were; a
run directory refuses other inputs; modules come back as they were on every exit path."""

import inspect
import math
import re

import pytest
import torch
import torch.nn as nn
import yaml
from test_api import FcStudent, digits, sequential_teacher
from tiny import run_cli, tiny

import refilled
import refilled.distillation as distillation
from refilled.config import Config, SHORTCUTS, is_default
from refilled.errors import RefilledError, RunDirError, TrainingDiverged

FAST = dict(stage1_epochs=1, stage2_epochs=1, batch_size=20, m_per_class=4, lr=0.05, stage1_lr=0.05,
            device="cpu", progress=False)


def data(lo=5, hi=10, per_class=12, seed=0):
    x, y = digits(lo, hi, per_class=per_class, seed=seed)
    return x, y


def snapshot(*modules):
    """What 'as they were' compares: weights and buffers, modes, requires_grad, hooks."""
    out = []
    for m in modules:
        out.append((
            {k: v.clone() for k, v in m.state_dict().items()},
            [s.training for s in m.modules()],
            [p.requires_grad for p in m.parameters()],
            [len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules()],
            [type(s) for s in m.modules()],
        ))
    return out


def assert_as_they_were(before, *modules):
    for (state, modes, grads, hooks, kinds), m in zip(before, modules):
        assert [type(s) for s in m.modules()] == kinds
        now = m.state_dict()
        assert state.keys() == now.keys()
        for k in state:
            assert torch.equal(state[k], now[k]), k
        assert [s.training for s in m.modules()] == modes
        assert [p.requires_grad for p in m.parameters()] == grads
        assert [len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules()] == hooks


@pytest.fixture()
def no_step(monkeypatch):
    """Fail the test if any optimizer step is taken."""
    def step(*args, **kwargs):
        raise AssertionError("an optimizer step was taken")

    monkeypatch.setattr(torch.optim.SGD, "step", step)


class AuxStudent(FcStudent):
    """Registers a second Linear after its classifier: the last-Linear guess is wrong."""

    def __init__(self, classes=5, use_aux=False):
        super().__init__(classes)
        self.aux = nn.Linear(8, classes)
        self.use_aux = use_aux

    def forward(self, x):
        z = self.body(x).mean(dim=(2, 3))
        if self.use_aux:
            self.aux(z)  # runs, but its output is not the logits
        return self.fc(z)


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        raise RuntimeError("the teacher's own bug")


class Labelled(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _x(n=60):
    return data()[0][:n]


X, Y = data()
NAN = X.float() / 255
NAN[3, 0, 2, 2] = math.nan

BAD = {  # name: (keyword arguments replacing the good ones, a piece of the message)
    "label gap": (dict(train=(X, Y + 5)), "class(es) 0-4 have no training image; shift them"),
    "single class": (dict(train=(X[Y == 0], Y[Y == 0])), "single class"),
    "one-hot labels": (dict(train=(X, nn.functional.one_hot(Y))), "one-hot"),
    "float labels": (dict(train=(X, Y.float())), "integer class indices"),
    "string labels": (dict(train=Labelled([(X[i], str(int(Y[i]))) for i in range(len(Y))])), "the string"),
    "3-tuple items": (dict(train=Labelled([(X[i], Y[i], i) for i in range(len(Y))])), "(image, label) pairs"),
    "dict": (dict(train={"images": X, "labels": Y}), "got a dict"),
    "numpy pair": (dict(train=(X.numpy(), Y.numpy())), "NumPy arrays"),
    "3-tuple": (dict(train=(X, Y, Y)), "a tuple of 3"),
    "labels count": (dict(train=(X, Y[:-1])), "images but"),
    "NaN pixels": (dict(train=(NAN, Y)), "NaN or infinite"),
    "inf val": (dict(val=(torch.full((5, 1, 8, 8), math.inf), torch.arange(5))), "NaN or infinite"),
    "val shape": (dict(val=(torch.zeros(5, 1, 9, 9, dtype=torch.uint8), torch.arange(5))), "shape"),
    "val channels": (dict(val=(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.arange(5))), "shape"),
    "val classes": (dict(val=(X[:10], torch.full((10,), 7))), "that the training data does not have"),
    "val dtype": (dict(val=(X[:10].float(), Y[:10])), "uint8"),
    "same module": ("same", "same module"),
    "aux head not run": (dict(student=AuxStudent()), "'aux' (the last nn.Linear it registers)"),
    "aux head not output": (dict(student=AuxStudent(use_aux=True)), "is not the logits"),
    "head not linear": (dict(head="body"), "not (batch, features)"),
    "head missing": (dict(head="classifier"), "no submodule 'classifier'"),
    "teacher embedding missing": (dict(teacher_embedding="nowhere"), "teacher_embedding=: the teacher has no submodule"),
    "teacher fails": (dict(teacher=Exploding()), "the teacher's own bug"),
    "num_classes=0": (dict(num_classes=0), "num_classes= must be at least 2"),
    "num_classes str": (dict(num_classes="5"), "num_classes= must be an integer"),
    "num_classes small": (dict(num_classes=3), "labels go up to 4"),
    "epochs str": (dict(stage1_epochs="3"), "stage1_epochs= expects an integer, got '3'"),
    "lr str": (dict(lr="0.1"), "lr= expects a number, got '0.1'"),
    "zero budget": (dict(stage1_epochs=0, stage2_epochs=0), "stage2_epochs=0 trains nothing"),
    "no pairs": (dict(m_per_class=1), "positive pair"),
    "too many classes": (dict(batch_size=40, m_per_class=4), "lower batch_size="),
    "unknown keyword": (dict(stage1_epoch=3), "unknown keyword stage1_epoch="),
    "unknown section key": (dict(stage2={"lamda": 3}), "unknown config key 'stage2.lamda'"),
    "bad preset": (dict(preset="icml"), "preset= must be one of"),
    "negative lam": (dict(lam=-1.0), "lam= is a weight"),
    "nan lr": (dict(lr=math.nan), "lr= must be a finite number"),
    "teacher not a module": (dict(teacher=lambda x: x), "torch.nn.Module"),
    "bad augment": (dict(augment=3), "augment="),
    "bad augment args": (dict(augment={"pad": "x"}), "is not a set of Augment arguments"),
    "mean channels": (dict(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), "give 3 values, but the images have 1"),
    "student without logits": (dict(embedding="output"), "gives no logits"),
    "shared classes shape": (dict(method="kd", shared_classes=([0, 1], [0])), "shared_classes="),
    "kd without shared": (dict(method="kd"), "shared_classes="),
    "no teacher": (dict(teacher=None), "needs a teacher"),
    "bad device": (dict(device="gpu"), "device="),
}


def call(case, tmp_path=None):
    teacher, student = sequential_teacher(), FcStudent(5)
    kwargs = dict(FAST)
    args = {"teacher": teacher, "student": student, "train": (X, Y)}
    spec, _ = BAD[case]
    if spec == "same":
        args["student"] = teacher
    else:
        for key, value in spec.items():
            (args if key in ("teacher", "student", "train") else kwargs)[key] = value
    return args, kwargs


CONFIG_KEYS = re.compile(r"\b(train|stage1|stage2|student|teacher|speed|baselines|data)\.[a-z_]+"
                         r"|out_dir|the command|config key")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_before_any_step_with_one_line_and_modules_as_they_were(case, no_step):
    args, kwargs = call(case)
    modules = [m for m in (args["teacher"], args["student"]) if isinstance(m, nn.Module)]
    modules = list({id(m): m for m in modules}.values())
    before = snapshot(*modules)
    with pytest.raises(RefilledError) as info:
        refilled.distill(args["teacher"], args["student"], args["train"], **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert BAD[case][1] in message, message
    assert "\n" not in message
    if case != "unknown section key":  # a section's own key, spelled as such
        assert not CONFIG_KEYS.search(message), f"a config key in a Python caller's message: {message}"
    assert_as_they_were(before, *modules)


def test_every_keyword_is_typed_alike(no_step):
    """A string for a number is refused the same way for every numeric keyword."""
    sig = inspect.signature(refilled.distill)
    for word, param in sig.parameters.items():
        if not is_default(param.default) or isinstance(param.default, str):
            continue
        with pytest.raises(RefilledError, match=rf"^{word}= expects an? (integer|number), got '3' \(a string\)$"):
            refilled.distill(sequential_teacher(), FcStudent(5), (X, Y), **{**FAST, word: "3"})


def test_the_signature_shows_the_real_defaults_and_documents_every_keyword():
    sig = inspect.signature(refilled.distill)
    defaults = Config()
    for word, param in sig.parameters.items():
        if word in SHORTCUTS and param.default is not None and word != "device":
            dotted = SHORTCUTS[word][0]
            node = defaults
            for part in dotted.split("."):
                node = getattr(node, part)
            assert param.default == node, (word, param.default, node)
            assert repr(param.default) == repr(node)  # shown as the plain value
    doc = refilled.distill.__doc__
    for word in sig.parameters:
        if word != "sections":
            assert re.search(rf"\b{word}\b", doc), f"{word} is not documented"
    assert "**sections" in doc
    for fn in (refilled.distill, refilled.prepare, refilled.fit, refilled.relation_matching_loss,
               refilled.local_classifier_loss, refilled.class_centers, refilled.RelationMatchingLoss,
               refilled.LocalClassifierLoss, refilled.teacher_instance_weights):
        assert "SPEC" not in (fn.__doc__ or ""), fn


def test_one_error_family():
    for cls in (refilled.ConfigError, refilled.DataError, refilled.RunDirError,
                refilled.TrainingDiverged, refilled.DatasetNotFoundError, refilled.UserError):
        assert issubclass(cls, refilled.RefilledError) and issubclass(cls, ValueError)
    with pytest.raises(ValueError):
        refilled.relation_matching_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1]))


# ------------------------------------------------------------------ the run directory


def _fit(teacher, student, train, run_dir, **extra):
    return refilled.distill(teacher, student, train, run_dir=run_dir, **{**FAST, **extra})


def test_a_run_directory_refuses_another_teacher_other_data_or_another_student(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = sequential_teacher()
    val = data(per_class=4, seed=1)
    run_dir = tmp_path / "run"
    torch.manual_seed(1)
    _fit(teacher, FcStudent(5), (X, Y), run_dir, val=val)
    assert (run_dir / "inputs.json").is_file() and (run_dir / "stage2.ckpt").is_file()

    def step(*args, **kwargs):
        raise AssertionError("an optimizer step was taken")

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    cases = [
        (dict(teacher=sequential_teacher()), "the teacher's weights and buffers"),  # other weights
        (dict(train=(X[:-5], Y[:-5])), "the training data"),
        (dict(val=data(per_class=4, seed=2)), "the validation data"),
        (dict(seed=2), "the student's architecture or starting weights"),
    ]
    for change, piece in cases:
        args = {"teacher": teacher, "train": (X, Y), "val": val, **change}
        torch.manual_seed(args.pop("seed", 1))
        student = FcStudent(5)
        before = snapshot(args["teacher"], student)
        with pytest.raises(RunDirError, match=re.escape(piece)) as info:
            _fit(args["teacher"], student, args["train"], run_dir, val=args["val"])
        assert "\n" not in str(info.value) and "run_dir=" in str(info.value)
        assert_as_they_were(before, args["teacher"], student)
    # the same inputs resume: nothing retrains (no step), the stored student comes back
    torch.manual_seed(1)
    again = _fit(teacher, FcStudent(5), (X, Y), run_dir, val=val)
    assert len(again.refilled_history) == 2


def test_a_run_directory_that_trained_nothing_takes_new_inputs(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RefilledError, match="positive pair"):
        _fit(sequential_teacher(), FcStudent(5), (X, Y), run_dir, m_per_class=1)
    torch.manual_seed(0)
    _fit(sequential_teacher(), FcStudent(5), (X[:-5], Y[:-5]), run_dir)  # other data: accepted
    assert (run_dir / "stage2.ckpt").is_file()


# ------------------------------------------------------------------ every exit path


def test_modules_come_back_after_a_failure_mid_run(tmp_path):
    teacher, student = sequential_teacher().train(), FcStudent(5)
    teacher_before = snapshot(teacher)
    with pytest.raises(TrainingDiverged, match="lower the learning rate \\(stage1_lr=\\)") as info:
        refilled.distill(teacher, student, (X, Y), **{**FAST, "stage1_lr": 1e30, "stage1_epochs": 2})
    assert "\n" not in str(info.value)
    assert_as_they_were(teacher_before, teacher)
    assert all(p.requires_grad for p in student.parameters())  # the classifier is trainable again
    assert student.training and not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


def test_modules_come_back_after_a_keyboard_interrupt(monkeypatch):
    teacher, student = sequential_teacher(), FcStudent(5).eval()
    real = distillation.train_stage

    def interrupted(stage, *args, **kwargs):
        if stage == "stage2":
            raise KeyboardInterrupt
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(distillation, "train_stage", interrupted)
    before = snapshot(teacher)
    with pytest.raises(KeyboardInterrupt):
        refilled.distill(teacher, student, (X, Y), **FAST)
    assert_as_they_were(before, teacher)
    assert not student.training and all(not m.training for m in student.modules())
    assert all(p.requires_grad for p in student.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


def test_success_gives_the_modules_back_in_their_modes():
    teacher, student = sequential_teacher().train(), FcStudent(5).eval()
    before = snapshot(teacher)
    out = refilled.distill(teacher, student, (X, Y), **FAST)
    assert out is student and not student.training and len(student.refilled_history) == 2
    assert_as_they_were(before, teacher)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


def test_prepare_then_fit_and_a_plan_closed_unfitted():
    teacher, student = sequential_teacher(), FcStudent(5)
    cfg = refilled.make_config(settings={"stage1.optim.epochs": 1, "train.epochs": 1, "device": "cpu",
                                         "progress": False, "train.batch_size": 20,
                                         "stage1.optim.batch_size": 20, "train.m_per_class": 4,
                                         "stage1.optim.m_per_class": 4})
    plan = refilled.prepare(teacher, student, (X, Y), config=cfg)
    assert [key for key, _ in plan.stages] == ["stage1.optim", "train"] and plan.num_classes == 5
    assert any(m._forward_pre_hooks for m in student.modules())  # the wrapper's, while planned
    history = refilled.fit(plan)
    assert student.refilled_history is history and len(history) == 2
    assert not any(m._forward_pre_hooks for m in student.modules())
    with pytest.raises(RefilledError, match="prepare\\(\\) a new one"):
        refilled.fit(plan)
    with refilled.prepare(teacher, FcStudent(5), (X, Y), config=cfg) as unfitted:
        assert unfitted.teacher is not None
    assert not any(m._forward_pre_hooks for m in teacher.modules())


def test_a_schedule_of_few_steps_is_named_before_training(no_step):
    """The defaults' 128-image batches on 60 images: one step an epoch, 10 a stage. Said
    once per stage, with what to change, pointing at the caller's line; not said when the
    schedule has steps enough (each stage's own batch size and epochs count)."""
    x, y = X, Y
    assert len(y) == 60
    with pytest.warns(UserWarning) as said, pytest.raises(AssertionError, match="optimizer step"):
        refilled.distill(sequential_teacher(), FcStudent(5), (x, y), device="cpu", progress=False)
    lines = [str(w.message) for w in said if "SGD step" in str(w.message)]
    assert lines == [
        "refilled: stage 1 takes only 10 SGD steps (60 training images, batch_size=128: 1 step an "
        "epoch, stage1_epochs=10); a network trained from scratch needs hundreds: give it a smaller "
        "batch size or more epochs",
        "refilled: stage 2 takes only 10 SGD steps (60 training images, batch_size=128: 1 step an "
        "epoch, stage2_epochs=10); a network trained from scratch needs hundreds: give it a smaller "
        "batch size or more epochs"]
    assert all(w.filename == __file__ for w in said if "SGD step" in str(w.message))
    cfg = refilled.make_config(settings={"train.batch_size": 20, "train.epochs": 10,
                                         "stage1.optim.batch_size": 10, "stage1.optim.epochs": 4})
    spec = distillation.method_spec("refilled")
    assert [line.split(" (")[0] for line in distillation.few_steps(cfg, spec, 100)] == [
        "stage 1 takes only 40 SGD steps"]  # stage 2: 5 x 10 = 50, enough
    assert distillation.few_steps(cfg, distillation.method_spec("ce"), 100) == []
    assert distillation.few_steps(cfg, spec, 200) == []


# ------------------------------------------------------------------ the loss modules and functions


B = 8
S, T, LAB = torch.randn(B, 4), torch.randn(B, 6), torch.arange(B) % 3
LOGITS, CENTERS = torch.randn(B, 3), torch.randn(3, 6)
LOSS_CASES = {
    "float labels": (lambda: refilled.relation_matching_loss(S, T, LAB.float()), "integer class indices"),
    "2-D labels": (lambda: refilled.relation_matching_loss(S, T, nn.functional.one_hot(LAB)), "one-hot"),
    "negative labels": (lambda: refilled.relation_matching_loss(S, T, LAB - 1), ">= 0"),
    "1-D student": (lambda: refilled.relation_matching_loss(S[:, 0], T, LAB), "student_emb must be 2-D"),
    "teacher rows": (lambda: refilled.relation_matching_loss(S, T[:5], LAB), "teacher_emb has 5 rows"),
    "negative margin": (lambda: refilled.relation_matching_loss(S, T, LAB, margin=-0.1), "margin must be >= 0"),
    "module margin": (lambda: refilled.RelationMatchingLoss(margin=-1), "margin must be >= 0"),
    "int embeddings": (lambda: refilled.relation_matching_loss(S.long(), T, LAB), "floating point"),
    "devices": (lambda: refilled.relation_matching_loss(S, T.to("meta"), LAB), "different devices"),
    "local labels range": (lambda: refilled.local_classifier_loss(LOGITS, T, LAB + 1, CENTERS), "go up to 3"),
    "local centers width": (lambda: refilled.local_classifier_loss(LOGITS, T, LAB, CENTERS[:, :5]), "centers must be"),
    "local weights length": (lambda: refilled.local_classifier_loss(LOGITS, T, LAB, CENTERS, weights=torch.ones(3)), "weights"),
    "local float labels": (lambda: refilled.LocalClassifierLoss()(LOGITS, T, LAB.float(), CENTERS), "integer class indices"),
    "local 1-D logits": (lambda: refilled.local_classifier_loss(LOGITS[:, 0], T, LAB, CENTERS), "student_logits must be 2-D"),
    "centers labels": (lambda: refilled.class_centers(T, LAB + 5, 3), "go up to 7"),
    "centers float labels": (lambda: refilled.class_centers(T, LAB.float(), 3), "integer class indices"),
    "centers num_classes": (lambda: refilled.class_centers(T, LAB, 0), "num_classes must be an integer >= 1"),
    "local_centers labels": (lambda: refilled.local_centers(T, LAB + 3, 3), "go up to"),
    "kd shapes": (lambda: refilled.kd_loss(LOGITS, LOGITS[:, :2]), "shapes must match"),
    "kd temperature": (lambda: refilled.kd_loss(LOGITS, LOGITS, temperature=0), "temperature must be > 0"),
    "pkt batch": (lambda: refilled.pkt_loss(S, T[:3]), "same batch size"),
    "smoothing labels": (lambda: refilled.label_smoothing_ce(LOGITS, LAB + 3), "go up to"),
    "mining margin": (lambda: refilled.semihard_tuples(S, LAB, margin=-1), "margin must be >= 0"),
    "weights logits": (lambda: refilled.teacher_instance_weights(LOGITS[:, 0]), "must be 2-D"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_the_losses_check_their_arguments(case):
    fn, piece = LOSS_CASES[case]
    with pytest.raises(RefilledError) as info:
        fn()
    assert piece in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_training_path_uses_the_unchecked_forms_which_agree():
    from refilled.losses import _local_classifier_loss, _relation_matching_terms

    got = refilled.relation_matching_loss(S, T, LAB, margin=0.5)
    assert torch.equal(got, _relation_matching_terms(S, T, LAB, margin=0.5)[0])
    got = refilled.local_classifier_loss(LOGITS, T, LAB, CENTERS)
    assert torch.equal(got, _local_classifier_loss(LOGITS, T, LAB, CENTERS))


# ------------------------------------------------------------------ the command line


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny(), "out_dir": str(tmp_path / "runs")}))
    return path


@pytest.mark.parametrize("overrides, piece", [
    (["train.epochs=0"], "train.epochs=0 trains nothing"),
    (["method=ce", "train.epochs=0"], "train.epochs=0 trains nothing"),
    (["teacher.optim.epochs=0"], "train.epochs=0 trains nothing"),  # the teacher's own fit
    (["train.epochs='3'"], "config key 'train.epochs' expects an integer, got '3'"),
    (["train.lr='0.1'"], "config key 'train.lr' expects a number"),
])
def test_the_cli_refuses_a_zero_budget_and_strings_for_numbers(config, capsys, tmp_path, overrides, piece):
    code, _, err = run_cli(capsys, "run", config, *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert piece in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_the_cli_refuses_a_run_directory_whose_teacher_file_changed(config, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config, "method=ce", "student.arch=mlp", "seed=3",
                             "data.student_offset=0", "train.m_per_class=0", "name=t")
    assert code == 0, err
    teacher = tmp_path / "runs" / "t" / "model.pt"
    args = ("run", config, f"teacher.checkpoint={teacher}", "teacher.arch=mlp", "name=s")
    code, first, err = run_cli(capsys, *args)
    assert code == 0, err
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["state_dict"] = {k: v + 1 for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, teacher)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "the teacher's weights and buffers differ" in err, err
    assert "name= or out_dir=" in err


def test_one_cli_run_does_each_thing_once(config, capsys, monkeypatch, tmp_path):
    """With a teacher trained in the same call: one rehearsal per network pair, one set-up and
    one probe per network, one run-directory open and one seeding per run."""
    import refilled.pipeline as pipeline
    import refilled.runs as runs
    from refilled.networks import Network

    counts = {"rehearse": 0, "set_up": 0, "open": [], "seed": 0, "probe": []}

    def wrap(module, fn_name, key):
        real = getattr(module, fn_name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, counted)

    wrap(distillation, "rehearse", "rehearse")
    wrap(distillation, "_set_up", "set_up")
    wrap(pipeline, "seed_everything", "seed")
    real_open = runs.RunDir.open.__func__
    monkeypatch.setattr(runs.RunDir, "open", classmethod(
        lambda cls, path, *a, **k: counts["open"].append(str(path)) or real_open(cls, path, *a, **k)))
    real_pass = Network.features_and_logits
    monkeypatch.setattr(Network, "features_and_logits", lambda self, x: (
        counts["probe"].append(self.role) if not torch.is_grad_enabled() and not self.training
        and x.shape[0] == 4 else None) or real_pass(self, x))
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0, err
    assert counts["rehearse"] == 2 and counts["set_up"] == 2 and counts["seed"] == 2
    assert len(counts["open"]) == 2 and len(set(counts["open"])) == 2
    assert sorted(counts["probe"]) == ["student", "teacher"]
