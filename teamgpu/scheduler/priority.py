"""Priority classes, used end to end: keys (ceiling and default), the ``X-Priority``
header, the scheduler, the audit row and metric labels (by :attr:`PriorityClass.label`).

The int value of a class is also what the gateway sends upstream as vLLM's ``priority``
field (vLLM started with ``--scheduling-policy priority`` serves lower values first), so
the engine's own ordering and preemption agree with the gateway's.
"""

from __future__ import annotations

from enum import IntEnum

from teamgpu.scheduler.errors import InvalidPriority

__all__ = ["PriorityClass"]

_ALIASES = {
    "high": 0,
    "interactive": 0,
    "normal": 1,
    "low": 2,
    "batch": 2,
}


class PriorityClass(IntEnum):
    """A request's priority class; a lower value is served first.

    Between classes the order is strict (after aging, see ``FairQueueConfig.aging_s``);
    within a class users share by the Virtual Token Counter.
    """

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str) -> PriorityClass:
        """Parse a class name as sent in the ``X-Priority`` header.

        Args:
            value: ``high``, ``normal`` or ``low``, or the aliases ``interactive`` (high)
                and ``batch`` (low); case-insensitive, surrounding blanks ignored.

        Returns:
            The class.

        Raises:
            InvalidPriority: For any other value (the client sees 400).
        """
        try:
            return cls(_ALIASES[value.strip().lower()])
        except (KeyError, AttributeError):
            raise InvalidPriority(
                f"invalid priority {value!r}: expected one of high, normal, low "
                "(aliases: interactive, batch)"
            ) from None

    @property
    def label(self) -> str:
        """The class's name as clients, the audit log and metric labels spell it:
        ``high``, ``normal`` or ``low``."""
        return self.name.lower()

    @classmethod
    def accepted_names(cls) -> tuple[str, ...]:
        """Every name :meth:`parse` takes: the labels and the aliases."""
        return tuple(_ALIASES)

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        """Every class's label, best first: ``("high", "normal", "low")``."""
        return tuple(c.label for c in cls)

    def capped(self, ceiling: PriorityClass) -> PriorityClass:
        """This class, or ``ceiling`` if this one is above it (a key's ``--max-priority``)."""
        return PriorityClass(max(self, ceiling))

    def promoted(self, levels: int) -> PriorityClass:
        """Return the class ``levels`` steps better than this one, never above HIGH."""
        return PriorityClass(max(PriorityClass.HIGH, self - max(0, levels)))
