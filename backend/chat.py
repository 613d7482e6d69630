"""Turn chat messages into a prompt: the GGUF's own template, else a fallback by architecture.

A GGUF without `tokenizer.chat_template` (the bundled gemma model is one) would otherwise get
a generic format the model was never trained on and answer nothing useful, so the fallback is
chosen by `general.architecture`, config can name another, and the template in use is always
reported (`ChatTemplate.source`) so the UI can show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import BadRequest, ConfigError

BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": (
        "{{ bos_token }}"
        "{% set system = namespace(text='') %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set system.text = system.text + m['content'] + '\n\n' %}{% endif %}{% endfor %}"
        "{% set first = namespace(done=false) %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "<start_of_turn>{{ role }}\n"
        "{% if not first.done and role == 'user' %}{{ system.text }}{% endif %}"
        "{% set first.done = true %}"
        "{{ m['content'] | trim }}<end_of_turn>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}{% set sys = namespace(text='') %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set sys.text = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
        "{% elif m['role'] == 'user' %}[INST] {{ sys.text }}{{ m['content'] | trim }} [/INST]"
        "{% set sys.text = '' %}{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

ARCHITECTURE_FALLBACK: dict[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "llama": "llama2", "qwen2": "chatml", "qwen3": "chatml", "qwen2moe": "chatml",
    "qwen3moe": "chatml", "phi3": "chatml",
}
DEFAULT_FALLBACK = "chatml"


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "gguf", "config", or "fallback:<name>"
    text: str
    bos_token: str
    eos_token: str

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt for `messages` (Hugging Face's shapes: see `request.Message.template_dict`);
        `tools` and template switches such as `enable_thinking` reach the template as variables."""
        try:
            template = _environment().from_string(self.text)
            return template.render(
                **kwargs,
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:  # a template is code: any failure is about these messages or it
            raise BadRequest(f"chat template ({self.source}) failed on these messages: "
                             f"{type(exc).__name__}: {exc}") from None


def choose_template(*, gguf_template: str | None, architecture: str, bos_token: str, eos_token: str,
                    config_format: str | None = None, config_template: str | None = None) -> ChatTemplate:
    """Config wins over the GGUF, the GGUF over the architecture fallback."""
    if config_template:
        return ChatTemplate("config", config_template, bos_token, eos_token)
    if config_format:
        if config_format not in BUILTIN_TEMPLATES:
            raise ConfigError(
                f"chat_format = {config_format!r}: unknown; choose one of {', '.join(sorted(BUILTIN_TEMPLATES))}"
            )
        return ChatTemplate(f"config:{config_format}", BUILTIN_TEMPLATES[config_format], bos_token, eos_token)
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, bos_token, eos_token)
    name = ARCHITECTURE_FALLBACK.get(architecture, DEFAULT_FALLBACK)
    return ChatTemplate(f"fallback:{name}", BUILTIN_TEMPLATES[name], bos_token, eos_token)


def _raise(message: str) -> None:
    raise TemplateError(message)


_ENV: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    """One sandboxed environment with the helpers Hugging Face templates expect."""
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV
