"""Chat templates: which one is chosen, what the built-ins render, and how bad input fails."""

from __future__ import annotations

from typing import Any

import pytest

from corral.backend.chat import (
    ARCHITECTURE_FALLBACK,
    BUILTIN_TEMPLATES,
    ChatTemplate,
    choose_template,
)
from corral.backend.errors import BadRequest, ConfigError, CorralError
from corral.backend.request import ROLES, chat_request

GGUF_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def choose(**kw: Any) -> ChatTemplate:
    base: dict[str, Any] = dict(gguf_template=None, architecture="llama", bos_token="<s>", eos_token="</s>")
    base.update(kw)
    return choose_template(**base)


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


# --- choose_template ------------------------------------------------------------------------


def test_config_template_wins_over_everything() -> None:
    t = choose(config_template="{{ 'custom' }}", config_format="chatml", gguf_template=GGUF_TEMPLATE,
               architecture="gemma3")
    assert t.source == "config"
    assert t.text == "{{ 'custom' }}"
    assert t.render(msgs(("user", "hi"))) == "custom"


def test_config_format_wins_over_gguf_and_architecture() -> None:
    t = choose(config_format="llama3", gguf_template=GGUF_TEMPLATE, architecture="gemma3")
    assert t.source == "config:llama3"
    assert t.text == BUILTIN_TEMPLATES["llama3"]


def test_gguf_template_wins_over_architecture_fallback() -> None:
    t = choose(gguf_template=GGUF_TEMPLATE, architecture="gemma3")
    assert t.source == "gguf"
    assert t.render(msgs(("user", "hi"))) == "<s>[user] hi\n"


@pytest.mark.parametrize(("architecture", "source"), [
    ("gemma3", "fallback:gemma"),
    ("gemma", "fallback:gemma"),
    ("gemma2", "fallback:gemma"),
    ("llama", "fallback:llama2"),
    ("qwen2", "fallback:chatml"),
    ("qwen3", "fallback:chatml"),
    ("phi3", "fallback:chatml"),
    ("never-heard-of-it", "fallback:chatml"),
    ("", "fallback:chatml"),
])
def test_architecture_fallback(architecture: str, source: str) -> None:
    t = choose(architecture=architecture)
    assert t.source == source
    assert t.text == BUILTIN_TEMPLATES[source.split(":", 1)[1]]


def test_every_fallback_names_a_builtin() -> None:
    assert set(ARCHITECTURE_FALLBACK.values()) <= set(BUILTIN_TEMPLATES)


def test_empty_strings_fall_through() -> None:
    t = choose(config_template="", config_format="", gguf_template="", architecture="gemma3")
    assert t.source == "fallback:gemma"


def test_tokens_are_carried() -> None:
    t = choose(bos_token="<B>", eos_token="<E>")
    assert (t.bos_token, t.eos_token) == ("<B>", "<E>")


def test_unknown_config_format_is_a_config_error_listing_choices() -> None:
    with pytest.raises(ConfigError) as info:
        choose(config_format="vicuna", gguf_template=GGUF_TEMPLATE)
    message = str(info.value)
    assert "'vicuna'" in message
    assert "unknown" in message
    for name in BUILTIN_TEMPLATES:
        assert name in message


# --- built-in templates ---------------------------------------------------------------------


def gemma() -> ChatTemplate:
    t = choose_template(gguf_template=None, architecture="gemma3", bos_token="<bos>", eos_token="<eos>")
    assert t.source == "fallback:gemma"
    return t


def test_gemma_system_and_user() -> None:
    system, user = "You are terse.", "What is 2+2?"
    prompt = gemma().render(msgs(("system", system), ("user", user)))
    assert prompt == f"<bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_user_only() -> None:
    assert gemma().render(msgs(("user", "Hello"))) == "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_assistant_turn_uses_role_model_and_system_goes_to_first_user_turn_only() -> None:
    prompt = gemma().render(msgs(("system", "S"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Again")))
    assert prompt == (
        "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "assistant" not in prompt
    assert prompt.count("S\n\n") == 1


def test_gemma_without_generation_prompt() -> None:
    prompt = gemma().render(msgs(("user", "Hi"), ("assistant", "Yo")), add_generation_prompt=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"


def test_gemma_trims_turn_content() -> None:
    assert gemma().render(msgs(("user", "  padded \n"))) == (
        "<bos><start_of_turn>user\npadded<end_of_turn>\n<start_of_turn>model\n")


def test_chatml() -> None:
    t = choose(config_format="chatml", bos_token="<s>")
    prompt = t.render(msgs(("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")))
    assert prompt == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nV<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not prompt.startswith("<s>")
    assert t.render(msgs(("user", "U")), add_generation_prompt=False) == "<|im_start|>user\nU<|im_end|>\n"


def test_llama3() -> None:
    t = choose(config_format="llama3", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    prompt = t.render(msgs(("system", "S"), ("user", "U")))
    assert prompt == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama2() -> None:
    t = choose(config_format="llama2")
    prompt = t.render(msgs(("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")))
    assert prompt == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>[INST] V [/INST]"


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_renders_all_roles_and_keeps_the_text(name: str) -> None:
    t = choose(config_format=name)
    prompt = t.render(msgs(("system", "sys-text"), ("user", "user-text"), ("assistant", "bot-text"),
                           ("user", "user-two")))
    for text in ("sys-text", "user-text", "bot-text", "user-two"):
        assert prompt.count(text) == 1
    assert prompt.index("user-text") < prompt.index("bot-text") < prompt.index("user-two")


# --- a Hugging Face style template ----------------------------------------------------------

HF_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
{% set system_message = messages[0]['content'] %}
{% set loop_messages = messages[1:] %}
{% else %}
{% set system_message = '' %}
{% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if loop.first %}{{ bos_token }}{% endif %}
{% if message['role'] == 'user' %}
{% if loop.first and system_message %}
{{ '[INST] ' + system_message + '\\n\\n' + message['content'] | trim + ' [/INST]' -}}
{% else %}
{{ '[INST] ' + message['content'] | trim + ' [/INST]' -}}
{% endif %}
{% elif message['role'] == 'assistant' %}
{{ ' ' + message['content'] | trim + eos_token -}}
{% endif %}
{% endfor %}
"""


def hf() -> ChatTemplate:
    t = choose(gguf_template=HF_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert t.source == "gguf"
    return t


def test_hf_template_renders() -> None:
    prompt = hf().render(msgs(("system", "Be kind."), ("user", " Hi "), ("assistant", "Hello"), ("user", "Bye")))
    assert prompt == "<s>[INST] Be kind.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]"


def test_hf_template_bos_only_on_first_turn() -> None:
    prompt = hf().render(msgs(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert prompt.count("<s>") == 1 and prompt.startswith("<s>[INST] a [/INST]")


def test_hf_template_raise_exception_becomes_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        hf().render(msgs(("user", "a"), ("user", "b")))
    assert "roles must alternate" in str(info.value)
    assert "gguf" in str(info.value)  # says which template failed
    assert info.value.http_status == 400


def test_hf_template_with_strftime_now() -> None:
    t = choose(gguf_template="{{ strftime_now('%Y') }}|{{ messages | length }}")
    year, count = t.render(msgs(("user", "a"), ("assistant", "b"))).split("|")
    assert year.isdigit() and len(year) == 4
    assert count == "2"


def test_sandbox_blocks_mutating_messages() -> None:
    t = choose(gguf_template="{{ messages.append({'role': 'user', 'content': 'x'}) }}")
    messages = msgs(("user", "a"))
    with pytest.raises(BadRequest):
        t.render(messages)
    assert messages == msgs(("user", "a"))


@pytest.mark.parametrize("text", [
    "{% for m in messages %}",  # syntax error
    "{{ raise_exception('nope') }}",
    "{{ messages[0].__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
    "{{ undefined_thing.attr }}",
])
def test_template_failures_are_bad_requests(text: str) -> None:
    t = choose(config_template=text)
    with pytest.raises(BadRequest) as info:
        t.render(msgs(("user", "a")))
    assert "config" in str(info.value)


@pytest.mark.parametrize("text", [
    "{{ 1 + 'a' }}",
    "{{ messages | length // 0 }}",
])
def test_template_runtime_python_errors_are_bad_requests(text: str) -> None:
    t = choose(config_template=text)
    with pytest.raises(CorralError):
        t.render(msgs(("user", "a")))


# --- message validation ---------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "fragment"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    (None, "non-empty list"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "messages[1].role = 'wizard'"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "images are not supported"),
    ([{"role": "user", "content": "a"}, "just text"], "messages[1]"),
    ([{"role": "tool", "content": "42"}], "tool_call_id"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                            "function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments is not JSON"),
])
def test_invalid_messages_are_bad_requests_naming_the_problem(messages: Any, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        chat_request("m", messages)
    assert fragment in str(info.value)


def test_role_error_lists_allowed_roles() -> None:
    with pytest.raises(BadRequest) as info:
        chat_request("m", [{"role": "wizard", "content": "x"}])
    for role in ROLES:
        assert role in str(info.value)


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_valid_roles_pass(role: str) -> None:
    chat_request("m", [{"role": role, "content": ""}])


def test_text_parts_are_joined() -> None:
    request = chat_request("m", [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}])
    assert request.messages is not None and request.messages[0].content == "a\nb"
