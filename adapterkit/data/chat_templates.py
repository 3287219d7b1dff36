"""`model.chat_template`: a named chat template (the formats of the model families) or a Jinja file,
put on the tokenizer at load, checked to render a conversation, and saved with the model (so chat, eval,
export and GGUF all use it).

The names are formats, not models: a template only reads well to a model that learned it, and its turn
markers (`<|im_end|>`, `<|eot_id|>`, ...) are single tokens only in that family's tokenizer. With another
tokenizer they are tokenized as text, and EOS still ends each reply (the formatter adds it).
"""

from __future__ import annotations

from pathlib import Path

from adapterkit.errors import ConfigError, Problem, did_you_mean

CHAT_TEMPLATES: dict[str, str] = {
    # Qwen2/2.5/3, and many fine-tunes: <|im_start|>role\ncontent<|im_end|>
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3.x: a header per turn, <|eot_id|> after each
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Gemma 2/3: user and model turns only (a system message goes in front of the first user turn)
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% set ns.system = message['content'] | trim + '\n\n' %}"
        "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + message['content'] | trim"
        " + '<end_of_turn>\n' }}{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Phi-3: <|role|>\ncontent<|end|>
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And then?"},
         {"role": "assistant", "content": "Goodbye"}]


def resolve(name_or_path: str) -> str:
    """The template text of a name in CHAT_TEMPLATES or of a Jinja file."""
    if name_or_path in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(Problem("model.chat_template", f"'{path}' cannot be read ({e})",
                                      fix="pass a UTF-8 Jinja file")) from None
    hint = did_you_mean(name_or_path, CHAT_TEMPLATES)
    raise ConfigError(Problem("model.chat_template", f"'{name_or_path}' is neither a named template nor a file"
                              + (f" ({hint})" if hint else ""),
                              fix=f"use one of {', '.join(CHAT_TEMPLATES)}, or a path to a .jinja file"))


def apply(tokenizer: object, name_or_path: str) -> None:
    """Put the template on `tokenizer`, after checking that it renders a growing conversation: each
    reply's turn follows the conversation before it rendered with the generation prompt, which is how
    training finds the reply to supervise and how inference asks for one."""
    from jinja2 import TemplateError

    template = resolve(name_or_path)
    tokenizer.chat_template = template  # type: ignore[attr-defined]
    render = tokenizer.apply_chat_template  # type: ignore[attr-defined]
    try:
        for end in (3, 5):
            before = render(PROBE[:end - 1], tokenize=False, add_generation_prompt=True)
            after = render(PROBE[:end], tokenize=False)
            reply = PROBE[end - 1]["content"]
            if not after.startswith(before) or reply not in after[len(before):]:
                raise ConfigError(Problem("model.chat_template", f"'{name_or_path}' does not render a reply as the "
                                          "continuation of the conversation asked with add_generation_prompt, so "
                                          "the reply to supervise cannot be found",
                                          fix="end the template with an add_generation_prompt branch that opens the "
                                              "assistant's turn exactly as a rendered assistant message begins"))
        if not all(m["content"] in after for m in PROBE[1:]):
            raise ConfigError(Problem("model.chat_template", f"'{name_or_path}' leaves messages out of the conversation",
                                      fix="render every message's content"))
    except TemplateError as e:
        raise ConfigError(Problem("model.chat_template", f"'{name_or_path}' fails to render a conversation ({e})",
                                  fix="fix the template (it is given messages with role and content)")) from None
