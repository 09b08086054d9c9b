"""refilled: generalized knowledge distillation via relationship matching (REFILLED).

The Python API::

    import refilled
    student = refilled.distill(teacher, student, (images, labels), stage1_epochs=30, stage2_epochs=70)

    # or in two steps: every check first (no step taken), then the training
    plan = refilled.prepare(teacher, student, (images, labels), config=refilled.make_config())
    refilled.fit(plan)

    # or REFILLED's two losses in a training loop of your own:
    stage1 = refilled.RelationMatchingLoss(tau=4.0, margin=0.2)
    stage2 = refilled.LocalClassifierLoss(tau_teacher=1.0)
    centers = refilled.class_centers(teacher_embeddings, labels, num_classes)
"""

from refilled.version import __version__  # noqa: E402,F401

from refilled.errors import (
    ConfigError,
    DataError,
    DatasetNotFoundError,
    RefilledError,
    RunDirError,
    TrainingDiverged,
    UserError,
)
from refilled.losses import (
    LocalClassifierLoss,
    RelationMatchingLoss,
    at_loss,
    fitnet_loss,
    kd_loss,
    label_smoothing_ce,
    local_centers,
    local_classifier_loss,
    pkt_loss,
    relation_matching_loss,
    relation_matching_terms,
    rkd_loss,
    shared_kd_loss,
    sp_loss,
    teacher_instance_weights,
)
from refilled.mining import semihard_tuples
from refilled.ncm import class_centers, ncm_accuracy, ncm_logits
from refilled.networks import FrozenTeacher, Network
from refilled.distillation import History, Plan, distill, fit, prepare  # noqa: E402
from refilled.config import Config, load_config, make_config  # noqa: E402
from refilled.models import create_model, list_models  # noqa: E402
from refilled.export import load_student  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "DatasetNotFoundError",
    "FrozenTeacher",
    "History",
    "LocalClassifierLoss",
    "Network",
    "Plan",
    "RefilledError",
    "RelationMatchingLoss",
    "RunDirError",
    "TrainingDiverged",
    "UserError",
    "at_loss",
    "class_centers",
    "create_model",
    "distill",
    "fit",
    "fitnet_loss",
    "kd_loss",
    "label_smoothing_ce",
    "list_models",
    "load_student",
    "load_config",
    "local_centers",
    "local_classifier_loss",
    "make_config",
    "ncm_accuracy",
    "ncm_logits",
    "pkt_loss",
    "prepare",
    "relation_matching_loss",
    "relation_matching_terms",
    "rkd_loss",
    "semihard_tuples",
    "shared_kd_loss",
    "sp_loss",
    "teacher_instance_weights",
]
