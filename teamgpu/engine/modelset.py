"""The model set ``teamgpu up`` serves, from the flags, the settings or the demo set, and
each engine's in-flight slots.

Which models, first that applies:

1. ``--model A --model B`` (repeatable; :func:`teamgpu.settings.models_from_cli`); with one
   ``--model``, ``--served-model-name`` names it;
2. ``[[models]]`` in ``teamgpu.toml`` (``Settings.models``);
3. the ``model`` setting (``TEAMGPU_MODEL``), one model;
4. the demo set: the demo chat model and the demo embeddings model
   (:func:`teamgpu.engine.demo.demo_model_set`), or the chat model alone when the
   embeddings model was not prepared (with a note).

``--engine-arg`` flags go to every local engine; ``--tool-call-parser`` overrides every
generating model's ``tool_call_parser``.

**Slots for interactive work on top of the batch class's (issue 10).** Unless a model's
engine flags give ``--max-num-seqs`` (or ``--max-inflight`` sets the gateway's slots), its
engine is started with ``--max-num-seqs`` = vLLM's usual batch (16 on the CPU as
``teamgpu up`` sets it, 256 on a GPU) **plus** the reserves (``reserved_slots_high +
reserved_slots_normal``, 3 by default). The gateway's capacity is that number, so the
batch class may fill exactly the usual batch (what direct FIFO would run) and interactive
requests get the reserve on top, instead of out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from teamgpu.engine.demo import demo_model_set, missing_demo_models
from teamgpu.engine.supervisor import engine_arg
from teamgpu.preflight import ConfigError, engine_capacity
from teamgpu.settings import ModelConfig, Settings, models_from_cli

__all__ = ["CPU_BATCH", "GPU_BATCH", "ModelSet", "resolve_model_set"]

CPU_BATCH = 16  # --max-num-seqs as teamgpu up sets it on the CPU
GPU_BATCH = 256  # vLLM's default --max-num-seqs on a GPU


@dataclass(frozen=True)
class ModelSet:
    """What ``up`` serves.

    Attributes:
        models: the model set, engine flags final (``--max-num-seqs`` set).
        capacity: in-flight slots per backend of each model with a local engine.
        notes: things to tell the user (a demo model not prepared, ...).
    """

    models: list[ModelConfig]
    capacity: dict[str, int]
    notes: list[str]


def resolve_model_set(s: Settings, cli_models: tuple[str, ...], *,
                      served_model_name: str | None, tool_call_parser: str | None,
                      device: str, models_dir: Path) -> ModelSet:
    """The model set and each engine's slots (see the module docstring).

    Raises:
        ConfigError: ``--served-model-name`` with several models, a bad ``--max-num-seqs``,
            clashing names, or no demo model prepared when no model is given.
    """
    notes: list[str] = []
    try:
        if cli_models:
            models = models_from_cli(cli_models, s.engine_args)
        elif s.models:
            models = [m.model_copy(update={"engine_args": [*m.engine_args, *s.engine_args]})
                      if m.local else m for m in s.models]
        elif s.model:
            models = models_from_cli([s.model], s.engine_args)
        else:
            models = _demo(s, models_dir, notes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if served_model_name:
        if len(models) != 1:
            raise ConfigError("--served-model-name names one model: give it with a single "
                              "--model, or name each model in [[models]] (name = ...)")
        models = [models[0].model_copy(update={"name": served_model_name})]
    if tool_call_parser:
        models = [m.model_copy(update={"tool_call_parser": tool_call_parser})
                  if m.generates else m for m in models]
    reserve = s.reserved_slots_high + s.reserved_slots_normal
    batch = CPU_BATCH if device == "cpu" else GPU_BATCH
    out, capacity = [], {}
    for m in models:
        if not m.local:
            out.append(m)
            continue
        given = engine_arg(m.engine_args, "--max-num-seqs")
        if given is not None:
            seqs = engine_capacity(given, batch)
        elif s.max_inflight_per_backend is not None:
            seqs = max(batch, s.max_inflight_per_backend)
            m = m.model_copy(update={"engine_args": [*m.engine_args, "--max-num-seqs",
                                                     str(seqs)]})
        else:
            seqs = batch + reserve
            m = m.model_copy(update={"engine_args": [*m.engine_args, "--max-num-seqs",
                                                     str(seqs)]})
        capacity[m.name] = s.max_inflight_per_backend or seqs
        out.append(m)
    return ModelSet(models=out, capacity=capacity, notes=notes)


def _demo(s: Settings, models_dir: Path, notes: list[str]) -> list[ModelConfig]:
    missing = missing_demo_models(models_dir)
    chat, embed = demo_model_set(models_dir)
    if "scripts/prepare-demo-model.sh" in missing:
        raise ConfigError(f"the demo model is not prepared in {models_dir}: run "
                          "scripts/prepare-demo-model.sh (or ./run.sh), or pass --model")
    if missing:
        notes.append(f"the demo embeddings model is not prepared in {models_dir}: serving "
                     "the demo chat model alone (run scripts/prepare-demo-embed-model.sh, or "
                     "./run.sh, to serve both)")
        demo = [chat]
    else:
        demo = [chat, embed]
    return [m.model_copy(update={"engine_args": [*m.engine_args, *s.engine_args]})
            for m in demo]
