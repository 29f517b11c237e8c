"""State of the user's own, checkpointed with the job: a best metric, EMA
weights, a wandb run id, an early-stopping counter.

Why registration, not a hook: the runtime writes checkpoints on its own
(periodic, at preemption, at the end) and restores them before the user's
first step, so it must hold the objects themselves. Two kinds restore in
place, so that the user's references stay valid:

* anything with ``state_dict()`` and ``load_state_dict()`` (a module, an
  ``AveragedModel``, another optimizer, a metric object);
* a ``dict`` or ``list`` of plain values (numbers, strings, booleans,
  ``None``, nested dicts, lists and tuples, tensors), kept by reference:
  restoring clears it and fills it with the saved values.

A bare number or string cannot be restored in place (the name would point
at a new object), so it is refused with what to register instead. The
saved value is device 0's; under DDP each rank would keep its own copy, and
a value that differs between devices is the user's bug there too.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from slurm_singularity.runtime import stateformat
from slurm_singularity.runtime.api import RuntimeSetupError

log = logging.getLogger(__name__)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and \
        callable(getattr(obj, "load_state_dict", None))


def check(name: Any, obj: Any) -> None:
    """Refuse what cannot be checkpointed and restored in place.

    :raises RuntimeSetupError: names the state's name, its type and what is
        accepted.
    """
    if not isinstance(name, str) or not name:
        raise RuntimeSetupError(f"user state name {name!r} must be a non-empty string")
    if _is_stateful(obj):
        return
    if isinstance(obj, (dict, list)):
        try:
            stateformat.encode(obj)
        except stateformat.StateFormatError as exc:
            where = str(exc).replace("state", f"user state {name!r}", 1)
            raise RuntimeSetupError(where) from None
        return
    raise RuntimeSetupError(
        f"user state {name!r} is a {type(obj).__name__}, which the runtime cannot restore in "
        f"place: register an object with state_dict()/load_state_dict(), or a dict or list of "
        f"plain values kept by reference (e.g. {{{name!r}: value}})")


class UserState:
    """The registered objects by name, and the saved values of a restored
    checkpoint not yet claimed by a registration."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.saved: dict[str, Any] = {}        # from the checkpoint restored, by name
        self.restored_step: int | None = None  # step of that checkpoint

    def register(self, name: str, obj: Any) -> None:
        """Add ``obj`` under ``name``; when a checkpoint was restored, load
        its saved value into ``obj`` at once.

        :raises RuntimeSetupError: a bad object (see ``check``), a name
            registered twice, or a saved value that does not fit ``obj``.
        """
        check(name, obj)
        if name in self.objects:
            raise RuntimeSetupError(f"user state {name!r} is already registered")
        self.objects[name] = obj
        if self.restored_step is None:
            return
        if name not in self.saved:
            log.warning("the checkpoint of step %d holds no user state %r; it keeps the value "
                        "it has now", self.restored_step, name)
            return
        self._load(name, obj, self.saved.pop(name))

    def _load(self, name: str, obj: Any, value: Any) -> None:
        try:
            if _is_stateful(obj):
                obj.load_state_dict(value)
            elif isinstance(obj, dict) and isinstance(value, dict):
                obj.clear()
                obj.update(value)
            elif isinstance(obj, list) and isinstance(value, list):
                obj[:] = value
            else:
                raise TypeError(f"saved a {type(value).__name__}, registered a "
                                f"{type(obj).__name__}")
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeSetupError(f"user state {name!r} of the checkpoint of step "
                                    f"{self.restored_step} does not fit the object registered "
                                    f"now: {exc}") from exc

    def restore(self, saved: Mapping[str, Any] | None, step: int) -> None:
        """A checkpoint was restored: load what is registered, keep the rest
        for later registrations."""
        self.restored_step = step
        self.saved = dict(saved or {})
        for name, obj in self.objects.items():
            if name in self.saved:
                self._load(name, obj, self.saved.pop(name))
            else:
                log.warning("the checkpoint of step %d holds no user state %r; it keeps the "
                            "value it has now", step, name)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: each object's value, and saved values no
        registration claimed yet (carried on, never dropped)."""
        out = dict(self.saved)
        for name, obj in self.objects.items():
            out[name] = obj.state_dict() if _is_stateful(obj) else obj
        return out
