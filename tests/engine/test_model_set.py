"""The model set in the settings: [[models]] in teamgpu.toml, and the --model simple form."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from teamgpu.settings import ModelConfig, Settings, models_from_cli


def settings(**kw: object) -> Settings:
    return Settings(data_dir=Path("/tmp/unused"), **kw)  # type: ignore[arg-type]


def test_models_come_from_toml_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "teamgpu.toml"
    config.write_text('''
[[models]]
name = "coder"
model = "/models/Qwen2.5-Coder-7B-Instruct"
aliases = ["qwen", "gpt-4o"]
roles = ["chat", "edit", "apply"]
gpu_memory_utilization = 0.55

[[models]]
name = "minilm"
model = "/models/all-MiniLM-L6-v2"
roles = ["embed"]
on_demand = true
idle_ttl_s = 600
kv_cache_gib = 0
engine_args = ["--max-model-len", "256"]

[[models]]
name = "big"
backends = ["http://10.0.0.5:8000/v1/"]
''')
    monkeypatch.setenv("TEAMGPU_CONFIG", str(config))
    coder, minilm, big = settings().models

    assert coder.names() == ["coder", "qwen", "gpt-4o"]
    assert coder.roles == ["chat", "edit", "apply"] and coder.gpu_memory_utilization == 0.55
    assert coder.local and coder.generates and not coder.on_demand
    assert coder.tool_call_parser == "auto" and coder.idle_ttl_s == 900.0
    assert minilm.on_demand and minilm.idle_ttl_s == 600 and not minilm.generates
    assert minilm.engine_args == ["--max-model-len", "256"]
    assert not big.local and big.backends == ["http://10.0.0.5:8000"]
    assert big.roles == ["chat"]


def test_models_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMGPU_MODELS", '[{"name": "a", "model": "/m/a", "on_demand": true}]')
    [a] = settings().models
    assert a.name == "a" and a.on_demand


@pytest.mark.parametrize(("models", "message"), [
    ([{"name": "a", "model": "x"}, {"name": "a", "model": "y"}], "two models are named 'a'"),
    ([{"name": "a", "model": "x", "aliases": ["b"]}, {"name": "b", "model": "y"}],
     "'b' is the alias of model 'a' and again the name of model 'b'"),
    ([{"name": "a", "model": "x", "aliases": ["c"]}, {"name": "b", "model": "y",
                                                      "aliases": ["c"]}],
     "'c' is the alias of model 'a' and again the alias of model 'b'"),
    ([{"name": "a", "model": "x", "aliases": ["a"]}], "an alias repeats the name"),
    ([{"name": "a", "model": "x", "roles": ["chat", "code"]}],
     "model 'a': unknown role(s) 'code'; roles are chat, edit, apply, autocomplete, embed, rerank"),
    ([{"name": "a", "model": "x", "roles": []}], "roles may not be empty"),
    ([{"name": "a"}], "give model (a local engine) or backends"),
    ([{"name": "a", "backends": ["http://h:1"], "on_demand": True}], "on_demand needs a local"),
    ([{"name": "a", "model": "x", "engine_args": ["--gpu_memory_utilization=0.5"]}],
     "engine_args may not set --gpu-memory-utilization"),
    ([{"name": "a", "model": "x", "engine_args": ["--served-model-name", "b"]}],
     "engine_args may not set --served-model-name"),
    ([{"name": "a b", "model": "x"}], "may not be empty or contain spaces"),
    ([{"name": "a", "backends": ["10.0.0.1:8000"]}], "must start with http"),
    ([{"name": "a", "model": "x", "gpu_memory_utilization": 1.0}], "less than 1"),
    ([{"name": "a", "model": "x", "kv_cache_gib": 1.5}], "valid integer"),
    ([{"name": "a", "model": "x", "vram": 3}], "Extra inputs are not permitted"),
])
def test_a_bad_model_set_is_refused_with_a_clear_message(
    models: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(models=models)
    assert message in str(caught.value)


def test_model_aliases_may_not_redefine_a_model_name() -> None:
    with pytest.raises(ValidationError, match="model_aliases may not redefine a name of"):
        settings(models=[{"name": "a", "model": "x", "aliases": ["fast"]}],
                 model_aliases={"fast": "other"})
    settings(models=[{"name": "a", "model": "x"}], model_aliases={"fast": "a"})


def test_the_simple_form_names_each_model_after_its_last_path_component(
    tmp_path: Path
) -> None:
    embed = tmp_path / "all-MiniLM-L6-v2"
    embed.mkdir()
    (embed / "modules.json").write_text("[]")
    chat, embeddings, hub = models_from_cli(
        ["/models/SmolLM2-135M-Instruct/", str(embed), "Qwen/Qwen2.5-Coder-7B-Instruct"],
        engine_args=["--max-num-seqs=8"])

    assert (chat.name, chat.model) == ("SmolLM2-135M-Instruct", "/models/SmolLM2-135M-Instruct/")
    assert chat.roles == ["chat", "edit", "apply", "autocomplete"]
    assert embeddings.name == "all-MiniLM-L6-v2" and embeddings.roles == ["embed"]
    assert hub.name == "Qwen2.5-Coder-7B-Instruct" and hub.model == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert all(m.engine_args == ["--max-num-seqs=8"] for m in (chat, embeddings, hub))
    assert not any(m.on_demand for m in (chat, embeddings, hub))


def test_the_simple_form_refuses_two_models_with_one_name() -> None:
    with pytest.raises(ValueError, match=r"two models are named 'Qwen2\.5-7B'"):
        models_from_cli(["/a/Qwen2.5-7B", "/b/Qwen2.5-7B"])
    with pytest.raises(ValueError, match="folder or model id"):
        models_from_cli(["/"])


def test_a_model_config_is_a_plain_value() -> None:
    m = ModelConfig(name="a", model="/m/a", roles=["chat", "chat", "edit"])
    assert m.roles == ["chat", "edit"]  # repeats dropped
    assert m.model_copy(update={"on_demand": True}).on_demand
