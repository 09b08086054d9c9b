"""The tiny setting every end-to-end test starts from: scikit-learn's 8x8 digits, a few steps."""

import copy

TINY = {
    "device": "cpu",
    "progress": False,
    "data": {"name": "digits", "teacher_classes": 5, "student_offset": 5,
             "train_per_class": 12, "val_per_class": 8},
    "teacher": {"arch": "mlp", "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
    "student": {"arch": "cnn_small"},
    "train": {"epochs": 2, "batch_size": 20, "m_per_class": 4, "lr": 0.05},
    "stage1": {"optim": {"epochs": 2, "batch_size": 20, "m_per_class": 4, "lr": 0.05}},
}


def tiny(**sections) -> dict:
    """A copy of TINY with some sections' keys replaced, e.g. ``tiny(student={"arch": "mlp"})``."""
    tree = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def run_cli(capsys, *args):
    """``refilled ARGS`` in-process: (exit code, the printed results or None, stderr)."""
    import json

    from refilled.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.startswith("{") else None), err
