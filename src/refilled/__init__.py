"""refilled: generalized knowledge distillation via relationship matching (REFILLED)."""

__version__ = "0.1.0"
