"""Errors raised while launching and supervising the vLLM engine.

These are process-level errors for the CLI (``teamgpu up``), not HTTP errors: a client
never sees them directly. While the engine is down the gateway answers with its own
``ServiceUnavailable`` (503) from :mod:`teamgpu.errors`.

Tree::

    EngineError
    ├── EngineConfigError   an EngineSpec that cannot be launched (bad extra flags)
    │   └── ToolParserError      an unknown --tool-call-parser name
    ├── EngineStartError    the engine exited, timed out or was stopped before /health
    ├── EngineControlError  /sleep or /wake_up failed (CUDA sleep mode)
    ├── MemoryPlanError     the model set does not fit in GPU or CPU memory
    └── ModelUnavailableError a model of the fleet cannot serve now
        ├── UnknownModelError    no local engine has that name
        ├── NoRoomError          an on-demand model cannot start: nothing idle to evict
        ├── ModelStartTimeout    not ready within the caller's timeout
        └── ModelStartFailed     its engine failed to start (the log tail is attached)

The gateway maps ``ModelUnavailableError`` to its own ``ServiceUnavailable`` (503 with
``Retry-After``); the CLI prints ``MemoryPlanError`` and exits before any engine starts.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every engine launch or supervision error."""


class EngineConfigError(EngineError):
    """The engine spec cannot be turned into a command line.

    Raised by :func:`teamgpu.engine.supervisor.build_command`, for example when the extra
    flags try to set one the supervisor owns (``--port``, ``--host``, ...).
    """


class EngineStartError(EngineError):
    """The engine did not become healthy.

    The message ends with the tail of the engine's log, the usual place to see why.

    Attributes:
        returncode: the engine's exit status, or None if it was still running (timeout,
            or stopped on request) when the start was given up.
        log_tail: the last lines of the engine log of this attempt ("" without a log).
    """

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = ""):
        full = f"{message}\n--- engine log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(full)
        self.returncode = returncode
        self.log_tail = log_tail


class ToolParserError(EngineConfigError):
    """A ``--tool-call-parser`` value that vLLM would refuse (not one of its parsers).

    Raised by :func:`teamgpu.engine.tools.decide_tool_calling`; the message lists the
    parser names vLLM 0.32 registers.
    """


class EngineControlError(EngineError):
    """A control call to a running engine (``POST /sleep``, ``POST /wake_up``) failed.

    Attributes:
        status: the HTTP status the engine answered, or None on a transport error.
    """

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class MemoryPlanError(EngineError):
    """The model set does not fit: the message names each model's share and the total.

    Raised by :func:`teamgpu.engine.memory.plan_memory` before anything starts, so that
    ``teamgpu up`` can print it and exit instead of letting an engine die of OOM.
    """


class ModelUnavailableError(EngineError):
    """A model of the fleet cannot serve a request now.

    Attributes:
        model: the model's name.
    """

    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.model = model


class UnknownModelError(ModelUnavailableError):
    """No local engine of the fleet serves that name (remote-only models have none)."""


class NoRoomError(ModelUnavailableError):
    """An on-demand model cannot start now: memory is taken and no idle on-demand model
    can be stopped (or put to sleep) to make room. Busy and always-on models are never
    evicted. The message names what holds the memory."""


class ModelStartTimeout(ModelUnavailableError):
    """The model was not ready within the caller's timeout; its start goes on, and a
    later call waits for the same start."""


class ModelStartFailed(ModelUnavailableError):
    """The model's engine failed to start; ``__cause__`` is the :class:`EngineStartError`
    with the engine's log tail."""
