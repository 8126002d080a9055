"""Tool calling out of the box: vLLM's tool-call flags chosen from the chat template.

vLLM answers a request with ``tools`` and ``tool_choice: "auto"`` only when it was started
with ``--enable-auto-tool-choice --tool-call-parser NAME`` (else 400: ``"auto" tool choice
requires --enable-auto-tool-choice and --tool-call-parser to be set``), and the parser
must match the syntax the model writes its calls in. That syntax is in the model's chat
template, which renders the tool definitions and earlier tool calls, so the decision is
read from there (:func:`decide_tool_calling`):

1. the checkpoint's own ``response_template`` (``tokenizer_config.json``) with a
   ``tool_calls`` field: parser ``hf``, which reads that declaration;
2. a template that never mentions ``tools``: no flags, since the model would never see
   the tool definitions (the demo model SmolLM2-135M-Instruct is such a model);
3. otherwise the first rule of ``RULES`` whose markers all occur in the template, the
   markers being the literal tokens each vLLM 0.32 parser looks for
   (``vllm/tool_parsers/*`` and ``vllm/parser/*``);
4. a template that renders tools in a syntax no rule knows: no flags, and the reason says
   to pass ``--tool-call-parser``.

The override (``tool_call_parser`` of the model, ``--tool-call-parser`` of ``up``) is
``auto`` (the above), ``none`` (no flags) or a parser name (used as given). Flags the
user already put in the engine args win over all of this.

The gateway never imports vLLM; this module reads files only.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from teamgpu.engine.errors import ToolParserError
from teamgpu.engine.supervisor import engine_arg

__all__ = [
    "RULES",
    "VLLM_TOOL_PARSERS",
    "ToolCallDecision",
    "ToolRule",
    "decide_tool_calling",
    "detect_tool_parser",
    "read_chat_templates",
]

VLLM_TOOL_PARSERS = frozenset({
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31",
    "deepseek_v32", "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma",
    "gemma4", "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4",
    "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba",
    "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json",
    "llama4_pythonic", "longcat", "mimo", "minicpm5", "minimax_m2", "minimax_m3",
    "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json", "plamo3",
    "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss",
    "step3", "step3p5", "xlam",
})
"""The names vLLM 0.32 registers (``vllm/tool_parsers/__init__.py``)."""

TOOL_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "--tool-parser-plugin")
TOOLS_MENTIONED = re.compile(r"\b(?:custom_)?tools\b")


@dataclass(frozen=True)
class ToolRule:
    """Template markers that identify one tool-call syntax.

    Attributes:
        parser: the vLLM parser name.
        markers: strings that must all occur in the template.
        absent: strings that must not occur (to tell two syntaxes apart).
        syntax: what the model writes, for the reason line and the docs.
    """

    parser: str
    markers: tuple[str, ...]
    syntax: str
    absent: tuple[str, ...] = ()

    def matches(self, template: str) -> bool:
        return (all(m in template for m in self.markers)
                and not any(a in template for a in self.absent))


# Most specific first: several syntaxes share <tool_call>.
RULES: tuple[ToolRule, ...] = (
    ToolRule("minimax_m2", ("<minimax:tool_call>",), "MiniMax-M2 <minimax:tool_call> XML"),
    ToolRule("seed_oss", ("<seed:tool_call>",), "Seed-OSS <seed:tool_call>"),
    ToolRule("longcat", ("<longcat_tool_call>",), "LongCat <longcat_tool_call> JSON"),
    ToolRule("k2_horizon", ("<ifm|tool_calls>",), "K2 Horizon <ifm|tool_calls>"),
    ToolRule("kimi_k2", ("<|tool_calls_section_begin|>",), "Kimi K2 tool-call sections"),
    ToolRule("plamo3", ("<|plamo:begin_tool_requests:plamo|>",), "PLaMo 3 tool requests"),
    ToolRule("deepseek_v32", ("<｜DSML｜function_calls>",), "DeepSeek V3.2 DSML"),
    ToolRule("deepseek_v3", ("<｜tool▁calls▁begin｜>", "```json"),
             "DeepSeek V3 / R1 <｜tool▁call▁begin｜>type<｜tool▁sep｜>name + ```json"),
    ToolRule("deepseek_v31", ("<｜tool▁calls▁begin｜>",),
             "DeepSeek V3.1 <｜tool▁call▁begin｜>name<｜tool▁sep｜>arguments"),
    ToolRule("step3", ("<｜tool_calls_begin｜>",), "Step-3 <｜tool_calls_begin｜>"),
    ToolRule("lfm2", ("<|tool_call_start|>",), "LFM2 <|tool_call_start|>[pythonic]"),
    ToolRule("apertus", ("<|tools_prefix|>",), "Apertus <|tools_prefix|>[JSON]"),
    ToolRule("functiongemma", ("<start_function_call>",),
             "FunctionGemma <start_function_call>call:name{...}"),
    ToolRule("gemma4", ("<|tool_call>",), "Gemma 4 <|tool_call>call:..."),
    ToolRule("granite", ("<|tool_call|>",), "Granite 3 <|tool_call|>[JSON]"),
    ToolRule("granite-20b-fc", ("<function_call>",), "Granite 20B FC <function_call> JSON"),
    ToolRule("dots", ("<dots_function_call>",), "dots <dots_function_call>"),
    ToolRule("openai", ("<|channel|>", "to=functions"), "gpt-oss harmony (to=functions.NAME)"),
    ToolRule("glm45", ("<tool_call>", "<arg_key>"),
             "GLM-4.5 / 4.7 <tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>"),
    ToolRule("qwen3_coder", ("<tool_call>", "<function="),
             "Qwen3-Coder XML <tool_call><function=NAME><parameter=K>"),
    ToolRule("granite4", ("<tool_call>", "<|start_of_role|>"),
             "Granite 4 <tool_call> JSON"),
    ToolRule("hermes", ("<tool_call>",),
             "Hermes / Qwen2.5 / Qwen3 <tool_call>{JSON}</tool_call>"),
    ToolRule("mistral", ("[TOOL_CALLS]",), "Mistral [TOOL_CALLS]"),
    ToolRule("llama4_json", ("<|header_start|>", "JSON for a function call"),
             "Llama 4 JSON {\"name\", \"parameters\"}"),
    ToolRule("llama4_pythonic", ("<|header_start|>",), "Llama 4 pythonic [f(x=1)]"),
    ToolRule("phi4_mini_json", ("functools",), "Phi-4-mini functools[JSON]"),
    ToolRule("phi4_mini_json", ("<|tool|>", "<|/tool|>"), "Phi-4-mini functools[JSON]"),
    ToolRule("internlm", ("<|action_start|><|plugin|>",), "InternLM2 <|action_start|><|plugin|>"),
    ToolRule("hunyuan_a13b", ("<tool_calls>", "<|startoftext|>"),
             "Hunyuan-A13B <tool_calls>[JSON]"),
    ToolRule("jamba", ("<tool_calls>",), "Jamba <tool_calls>[JSON]"),
    ToolRule("olmo3", ("<function_calls>",), "Olmo 3 <function_calls> pythonic"),
    ToolRule("pythonic", ("<|start_header_id|>", "python list"),
             "Llama 3.2 pythonic [f(x=1)]"),
    ToolRule("llama3_json", ("<|start_header_id|>", "<|python_tag|>"),
             "Llama 3.1+ JSON {\"name\", \"parameters\"}"),
    ToolRule("llama3_json", ("<|start_header_id|>", "Environment: ipython"),
             "Llama 3.1+ JSON {\"name\", \"parameters\"}"),
)


@dataclass(frozen=True)
class ToolCallDecision:
    """Whether and how vLLM parses tool calls for one model.

    Attributes:
        parser: the ``--tool-call-parser`` name, or None (tool calling off, or set by
            the user's engine args).
        flags: what to add to the engine's command line (``()`` when none).
        reason: one line saying why, for ``teamgpu up`` to print.
    """

    parser: str | None
    flags: tuple[str, ...]
    reason: str


def _template_texts(value: object) -> list[str]:
    """A ``chat_template`` value: a string, or a list of ``{name, template}`` dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("template"), str)]
    return []


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_chat_templates(folder: Path) -> list[str]:
    """Every chat template a model folder ships, as transformers looks for them.

    ``chat_template.jinja``, ``additional_chat_templates/*.jinja``, ``chat_template.json``
    (``{"chat_template": ...}``) and ``tokenizer_config.json`` ``chat_template`` (a string
    or named templates, e.g. ``default`` and ``tool_use``).

    Returns:
        The template texts found (``[]`` for none).
    """
    texts: list[str] = []
    for path in [folder / "chat_template.jinja",
                 *sorted((folder / "additional_chat_templates").glob("*.jinja"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text(encoding="utf-8"))
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _read_json(folder / name)
        if isinstance(data, dict):
            texts += _template_texts(data.get("chat_template"))
    return texts


def _declares_tool_calls(folder: Path) -> bool:
    """Whether ``tokenizer_config.json`` has a ``response_template`` with ``tool_calls``."""
    data = _read_json(folder / "tokenizer_config.json")
    if not isinstance(data, dict):
        return False
    template = data.get("response_template")
    fields = template.get("fields") if isinstance(template, dict) else None
    return isinstance(fields, dict) and "tool_calls" in fields


def detect_tool_parser(templates: Sequence[str]) -> tuple[str | None, str]:
    """The parser for the tool-call syntax of ``templates``, and why.

    Args:
        templates: chat template texts (:func:`read_chat_templates`).

    Returns:
        ``(parser, reason)``; parser is None when the templates do not render tools or
        render them in a syntax no rule of ``RULES`` knows.
    """
    if not templates:
        return None, "the model has no chat template"
    text = "\n".join(templates)
    if not TOOLS_MENTIONED.search(text):
        return None, "its chat template does not render tools, so the model never sees them"
    for rule in RULES:
        if rule.matches(text):
            return rule.parser, f"its chat template writes tool calls as {rule.syntax}"
    return None, ("its chat template renders tools, but in a tool-call syntax teamgpu does "
                  "not recognise: pass --tool-call-parser NAME")


def decide_tool_calling(model: str, override: str = "auto", *,
                        engine_args: Sequence[str] = ()) -> ToolCallDecision:
    """The tool-call flags for one model's engine.

    Args:
        model: the local model folder (or a model id, whose template cannot be read
            here).
        override: ``auto``, ``none`` or a vLLM parser name.
        engine_args: the engine's flags so far; if they already hold
            ``--tool-call-parser`` or ``--enable-auto-tool-choice``, nothing is added.

    Returns:
        The decision; ``flags`` is ``("--enable-auto-tool-choice", "--tool-call-parser",
        NAME)`` or ``()``.

    Raises:
        ToolParserError: ``override`` is not ``auto``, ``none`` or a parser vLLM 0.32
            registers (unless ``engine_args`` load a ``--tool-parser-plugin``).
    """
    args = list(engine_args)
    given = engine_arg(args, "--tool-call-parser")
    if given is not None or "--enable-auto-tool-choice" in args:
        return ToolCallDecision(None, (), f"the engine args set tool calling themselves "
                                f"(--tool-call-parser {given or '(unset)'})")
    if override == "none":
        return ToolCallDecision(None, (), "tool calling is off (tool_call_parser = none)")
    if override != "auto":
        if override not in VLLM_TOOL_PARSERS and engine_arg(args, "--tool-parser-plugin") is None:
            raise ToolParserError(
                f"unknown tool-call parser {override!r}; vLLM 0.32 has "
                f"{', '.join(sorted(VLLM_TOOL_PARSERS))} (or auto, none)")
        return ToolCallDecision(override, _flags(override), f"tool_call_parser = {override}")

    template_file = engine_arg(args, "--chat-template")
    folder = Path(model).expanduser()
    if template_file is not None and Path(template_file).is_file():
        templates = [Path(template_file).read_text(encoding="utf-8")]
        source = f"--chat-template {template_file}"
    elif folder.is_dir():
        if _declares_tool_calls(folder):
            return ToolCallDecision("hf", _flags("hf"), "its tokenizer_config.json declares a "
                                    "response_template with tool_calls")
        templates = read_chat_templates(folder)
        source = "the model folder"
    else:
        return ToolCallDecision(None, (), f"{model!r} is not a local folder, so its chat "
                                "template cannot be read: pass --tool-call-parser NAME")
    parser, why = detect_tool_parser(templates)
    if parser is None:
        return ToolCallDecision(None, (), f"no tool calling: {why} ({source})")
    return ToolCallDecision(parser, _flags(parser), f"--tool-call-parser {parser}: {why}")


def _flags(parser: str) -> tuple[str, ...]:
    return ("--enable-auto-tool-choice", "--tool-call-parser", parser)
