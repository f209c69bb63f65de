"""Localized learning: rules, boundary selection (static, dynamic) and weak supervision."""

from distlocal.local.rules import RULES, LocalRule, correlation, is_finite, make_rule
from distlocal.local.schedule import (
    DynamicSelector,
    StaticSchedule,
    build_schedule,
    relative_update,
    stage_weights,
)
from distlocal.local.supervision import WeakSupervision

__all__ = [
    "RULES",
    "DynamicSelector",
    "LocalRule",
    "StaticSchedule",
    "WeakSupervision",
    "build_schedule",
    "correlation",
    "is_finite",
    "make_rule",
    "relative_update",
    "stage_weights",
]
