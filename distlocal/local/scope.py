"""The local rule's scope: tensors allocated inside :func:`local_scope` are the rule's temporaries.

While a footprint is measured (:func:`distlocal.profiler.footprint.track_footprint`) they are
filed under the category ``local`` instead of ``activation``; outside a measurement the scope is
one global read. It lives here, not with the footprint, so that the learner depends on nothing of
the profiler (the profiler's all-SGD reference builds a learner).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SCOPE = {"depth": 0, "tracking": 0}
"""``depth``: nesting of :func:`local_scope` now; ``tracking``: footprint measurements in progress."""


@contextlib.contextmanager
def local_scope() -> Iterator[None]:
    """Mark tensors allocated inside as the local rule's (category ``local``) during a measurement."""
    if not SCOPE["tracking"]:
        yield
        return
    SCOPE["depth"] += 1
    try:
        yield
    finally:
        SCOPE["depth"] -= 1
