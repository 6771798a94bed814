"""Surgery engines: where the stream gradients of a branch point are aggregated in backward."""

from impartial_train.engine.hooks import HookEngine, SurgeryPoint, plan_surgery
from impartial_train.engine.stats import PointStats

__all__ = ["HookEngine", "PointStats", "SurgeryPoint", "plan_surgery"]
