"""Tool-call parser chosen from a model's chat template (teamgpu.engine.tools).

The templates here are short stand-ins written for these tests: each renders ``tools`` and
writes a tool call the way one model family does, with the markers vLLM's parser for that
family looks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teamgpu.engine.errors import ToolParserError
from teamgpu.engine.tools import (
    VLLM_TOOL_PARSERS,
    decide_tool_calling,
    detect_tool_parser,
    read_chat_templates,
)

TOOLS = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"

TEMPLATES = {
    "hermes": CHATML + TOOLS + '<tool_call>\n{"name": "{{ c.name }}"}\n</tool_call>',
    "qwen3_coder": CHATML + TOOLS + "<tool_call>\n<function={{ c.name }}>\n"
                   "<parameter={{ k }}>\n{{ v }}\n</parameter>\n</function>\n</tool_call>",
    "llama3_json": "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                   + TOOLS + '{"name": "{{ c.name }}", "parameters": {{ c.arguments }}}'
                   "{{ '<|python_tag|>' }}<|eot_id|>",
    "pythonic": "<|start_header_id|>system<|end_header_id|>\n" + TOOLS
                + "respond with a python list of the calls [f(x=1)]<|eot_id|>",
    "llama4_pythonic": "<|header_start|>system<|header_end|>" + TOOLS + "<|python_start|>",
    "llama4_json": "<|header_start|>system<|header_end|>" + TOOLS
                   + "To call a function, please respond with JSON for a function call.",
    "mistral": "[AVAILABLE_TOOLS]" + TOOLS + "[/AVAILABLE_TOOLS][TOOL_CALLS]{{ calls }}</s>",
    "deepseek_v3": TOOLS + "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                   "{{ c.name }}\n```json\n{{ c.arguments }}\n```<｜tool▁call▁end｜>",
    "deepseek_v31": TOOLS + "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ c.name }}"
                    "<｜tool▁sep｜>{{ c.arguments }}<｜tool▁call▁end｜>",
    "granite": "<|start_of_role|>tools<|end_of_role|>" + TOOLS + "<|tool_call|>[{{ calls }}]",
    "granite4": "<|start_of_role|>system<|end_of_role|>" + TOOLS
                + '<tool_call>\n{"name": "{{ c.name }}"}\n</tool_call>',
    "glm45": TOOLS + "<tool_call>{{ c.name }}\n<arg_key>{{ k }}</arg_key>"
             "<arg_value>{{ v }}</arg_value></tool_call>",
    "kimi_k2": TOOLS + "<|tool_calls_section_begin|><|tool_call_begin|>{{ id }}",
    "minimax_m2": TOOLS + '<minimax:tool_call><invoke name="{{ c.name }}">',
    "openai": TOOLS + "<|start|>assistant to=functions.{{ c.name }}<|channel|>commentary",
    "phi4_mini_json": "<|system|>" + TOOLS + 'prefix calls with functools[{"name": ...}]',
    "internlm": TOOLS + "<|action_start|><|plugin|>\n{{ call }}<|action_end|>",
    "gemma4": TOOLS + "<|tool_call>call:{{ c.name }}{...}<tool_call|>",
    "functiongemma": TOOLS + "<start_function_call>call:{{ c.name }}{}<end_function_call>",
    "seed_oss": TOOLS + "<seed:tool_call><function={{ c.name }}>",
    "lfm2": TOOLS + "<|tool_call_start|>[{{ c.name }}()]<|tool_call_end|>",
    "hunyuan_a13b": "<|startoftext|>" + TOOLS + "<tool_calls>[{{ calls }}]</tool_calls>",
    "olmo3": TOOLS + "<function_calls>{{ c.name }}()</function_calls>",
}


@pytest.mark.parametrize(("parser", "template"), sorted(TEMPLATES.items()))
def test_the_parser_follows_the_template_tool_call_syntax(parser: str, template: str) -> None:
    found, reason = detect_tool_parser([template])
    assert found == parser, reason
    assert parser in VLLM_TOOL_PARSERS
    assert reason.startswith("its chat template writes tool calls as ")


def test_a_template_that_never_renders_tools_gets_no_parser() -> None:
    """SmolLM2-135M-Instruct's template is of this kind: plain ChatML and a default system
    prompt, no ``tools`` at all."""
    parser, reason = detect_tool_parser([CHATML + "<tool_call>"])
    assert parser is None and "does not render tools" in reason
    assert detect_tool_parser([]) == (None, "the model has no chat template")


def test_tools_in_an_unknown_syntax_ask_for_the_parser_by_name() -> None:
    parser, reason = detect_tool_parser([CHATML + TOOLS + "<<CALL>>{{ c.name }}"])
    assert parser is None and "pass --tool-call-parser NAME" in reason


def write_model(tmp_path: Path, **files: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_decision_reads_the_template_from_the_model_folder(tmp_path: Path) -> None:
    folder = write_model(tmp_path, **{"chat_template.jinja": TEMPLATES["hermes"]})
    decision = decide_tool_calling(str(folder))
    assert decision.parser == "hermes"
    assert decision.flags == ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert decision.reason.startswith("--tool-call-parser hermes: its chat template writes")


@pytest.mark.parametrize("where", ["tokenizer_config", "named", "json", "additional"])
def test_every_place_transformers_keeps_templates_is_read(tmp_path: Path, where: str) -> None:
    template = TEMPLATES["qwen3_coder"]
    layouts: dict[str, dict[str, object]] = {
        "tokenizer_config": {"tokenizer_config.json": {"chat_template": template}},
        "named": {"tokenizer_config.json": {"chat_template": [
            {"name": "default", "template": CHATML},
            {"name": "tool_use", "template": template}]}},
        "json": {"chat_template.json": {"chat_template": template}},
        "additional": {"additional_chat_templates__tools.jinja": template},
    }
    folder = write_model(tmp_path, **layouts[where])
    assert template in read_chat_templates(folder)
    assert decide_tool_calling(str(folder)).parser == "qwen3_coder"


def test_a_declared_response_template_uses_the_hf_parser(tmp_path: Path) -> None:
    folder = write_model(tmp_path, **{"tokenizer_config.json": {
        "chat_template": CHATML,
        "response_template": {"start_anchor": "<|im_start|>assistant\n",
                              "fields": {"content": {}, "tool_calls": {"open": "<call>"}}}}})
    decision = decide_tool_calling(str(folder))
    assert decision.parser == "hf" and "response_template with tool_calls" in decision.reason


def test_a_chat_template_flag_in_the_engine_args_is_what_counts(tmp_path: Path) -> None:
    folder = write_model(tmp_path, **{"chat_template.jinja": CHATML})
    custom = tmp_path / "tools.jinja"
    custom.write_text(TEMPLATES["llama3_json"])
    assert decide_tool_calling(str(folder)).parser is None
    decision = decide_tool_calling(str(folder), engine_args=["--chat-template", str(custom)])
    assert decision.parser == "llama3_json"


def test_the_demo_model_has_no_tool_calling() -> None:
    demo = Path.home() / ".cache" / "teamgpu" / "models" / "SmolLM2-135M-Instruct"
    if not demo.is_dir():
        pytest.skip("demo model not prepared")
    decision = decide_tool_calling(str(demo))
    assert decision.flags == () and "does not render tools" in decision.reason


def test_overrides_none_and_a_parser_name(tmp_path: Path) -> None:
    folder = write_model(tmp_path, **{"chat_template.jinja": TEMPLATES["hermes"]})
    off = decide_tool_calling(str(folder), "none")
    assert off.flags == () and "tool_call_parser = none" in off.reason
    forced = decide_tool_calling("Qwen/Qwen3-8B", "qwen3_xml")
    assert forced.flags == ("--enable-auto-tool-choice", "--tool-call-parser", "qwen3_xml")


def test_an_unknown_parser_name_is_refused_listing_vllms() -> None:
    with pytest.raises(ToolParserError, match=r"unknown tool-call parser 'hermez'.*hermes"):
        decide_tool_calling("m", "hermez")
    plugin = decide_tool_calling("m", "mine", engine_args=["--tool-parser-plugin", "p.py"])
    assert plugin.parser == "mine"


def test_flags_already_in_the_engine_args_win(tmp_path: Path) -> None:
    folder = write_model(tmp_path, **{"chat_template.jinja": TEMPLATES["hermes"]})
    decision = decide_tool_calling(str(folder), "llama3_json", engine_args=[
        "--enable-auto-tool-choice", "--tool-call-parser=mistral"])
    assert decision.flags == () and "--tool-call-parser mistral" in decision.reason


def test_a_model_id_cannot_be_decided_here() -> None:
    decision = decide_tool_calling("Qwen/Qwen2.5-7B-Instruct")
    assert decision.flags == () and "not a local folder" in decision.reason


def test_the_parser_names_match_the_installed_vllm() -> None:
    """VLLM_TOOL_PARSERS is the list in the engine venv's vLLM (when it is installed)."""
    import re

    venvs = sorted((Path.home() / ".cache" / "teamgpu").glob("engine-venv-*"))
    registry = [p for v in venvs
                for p in v.glob("lib/python3*/site-packages/vllm/tool_parsers/__init__.py")]
    if not registry:
        pytest.skip("no engine venv")
    text = registry[0].read_text()
    block = text[text.index("_TOOL_PARSERS_TO_REGISTER"):]
    names = set(re.findall(r'^    "([^"]+)": \(', block, flags=re.MULTILINE))
    assert names == VLLM_TOOL_PARSERS


def test_every_rule_is_in_the_table_of_docs_install() -> None:
    from teamgpu.engine.tools import RULES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "install.md").read_text()
    table = doc[doc.index("## Tool calling"):]
    for rule in RULES:
        assert f"| `{rule.parser}` |" in table, f"{rule.parser} missing from docs/install.md"
