"""Chat templates: turning torchrl ``History`` objects into prompt (and response) text.

Which template renders a history, in order of precedence: a custom Jinja string
(``chat_template``), a named template of torchrl (``chat_template_name``: ``chatml_format``,
``qwen``, ...), then the tokenizer's own ``chat_template``. With none of them a clear error is
raised rather than silently guessing a format the model never saw.
"""

from __future__ import annotations

from typing import Any

from tensordict import TensorDict
from torchrl.data.llm import History

try:  # the registry of named templates; private in torchrl, so guarded.
    from torchrl.data.llm.history import _CHAT_TEMPLATES as _NAMED_TEMPLATES
except ImportError:  # pragma: no cover - older/newer torchrl
    _NAMED_TEMPLATES = {"chatml_format": None, "qwen": None}


def template_names() -> list[str]:
    """Names accepted by ``chat_template_name``."""
    return sorted(_NAMED_TEMPLATES)


def check_template_args(
    chat_template_name: str | None,
    chat_template: str | None,
    keys: tuple[str, str] = ("chat_template_name", "chat_template"),
) -> None:
    """Validate a template choice (raises ``ValueError``/``TypeError``): the one home of this check for
    the wrapper's arguments and the ``chat_template`` config group, whose ``keys`` the errors name."""
    name_key, template_key = keys
    if chat_template_name is not None and chat_template is not None:
        raise ValueError(
            f"{name_key} and {template_key} are mutually exclusive: "
            f"got {name_key}={chat_template_name!r} and a custom {template_key}."
        )
    if chat_template_name is not None and chat_template_name not in _NAMED_TEMPLATES:
        raise ValueError(f"{name_key} must be one of {template_names()}, got {chat_template_name!r}.")
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(
            f"{template_key} must be a Jinja template string, got {type(chat_template).__name__}."
        )


def _template_kwargs(tokenizer: Any, name: str | None, template: str | None) -> dict[str, Any]:
    if template is not None:
        return {"chat_template": template}
    if name is not None:
        return {"chat_template_name": name}
    if getattr(tokenizer, "chat_template", None):
        return {"chat_template": tokenizer.chat_template}
    raise ValueError(
        "history input needs a chat template: pass chat_template_name (one of "
        f"{template_names()}) or chat_template (a Jinja string), or use a tokenizer that has one."
    )


def render_prompts(history: History, tokenizer: Any, name: str | None, template: str | None) -> list[str]:
    """Render a ``[B, T]`` history as generation prompts (with the assistant generation prompt)."""
    kwargs = _template_kwargs(tokenizer, name, template)
    text = history.apply_chat_template(tokenizer=tokenizer, add_generation_prompt=True, **kwargs)
    return [text] if isinstance(text, str) else list(text)


def render_prompt_response(
    history: History, tokenizer: Any, name: str | None, template: str | None
) -> tuple[list[str], list[str]]:
    """Split each ``[T]`` history whose last message is the assistant's into (prompt, response).

    The prompt is the history without its last message, rendered with the generation prompt;
    the response is what the full rendering adds after it (the answer and end-of-turn markup).
    """
    kwargs = _template_kwargs(tokenizer, name, template)
    prompts, responses = [], []
    for i in range(history.shape[0]):
        row = history[i]
        roles = [r for r in row.role if r != "<none>"]
        if not roles or roles[-1] != "assistant":
            raise ValueError(
                f"history[{i}]: scoring a history without text_response needs its last message to be "
                f"the assistant's (the response to score); got roles {roles}."
            )
        last = len(roles) - 1
        full = row[: last + 1].apply_chat_template(tokenizer=tokenizer, add_generation_prompt=False, **kwargs)
        prompt = row[:last].apply_chat_template(tokenizer=tokenizer, add_generation_prompt=True, **kwargs)
        if not full.startswith(prompt):
            raise ValueError(
                f"history[{i}]: the chat template does not render the conversation as the prompt followed "
                "by the answer; pass the response explicitly as text_response."
            )
        prompts.append(prompt)
        responses.append(full[len(prompt) :])
    return prompts, responses


def prompt_batch(examples: list[Any], chat: Any) -> TensorDict:
    """The policy's input for ``examples`` (``pipeline.tasks.Example``) under the ``chat_template`` config:
    plain-text prompts, or with a chat template a ``History`` per example: its conversation
    (``Example.messages``) or one user turn, after the configured system prompt."""
    if not chat.use_chat:
        return TensorDict(text=[e.prompt for e in examples], batch_size=[len(examples)])
    chats = []
    for e in examples:
        turns = [m._asdict() for m in e.messages] if e.messages else [{"role": "user", "content": e.prompt}]
        if chat.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": chat.system_prompt})
        chats.append(turns)
    return TensorDict(history=History.from_chats(chats), batch_size=[len(examples)])
