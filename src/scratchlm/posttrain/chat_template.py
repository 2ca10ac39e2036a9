"""The chat template: a list of messages to token ids, plus the mask of assistant tokens.

A conversation is rendered as

    <|endoftext|> <|system|>TEXT<|end|> <|user|>TEXT<|end|> <|assistant|>TEXT<|end|> ...

(no spaces: each role header and each `<|end|>` is one special token; the text between them is
the tokenizer's plain-text encoding of the message content, which can never produce a special id,
so a user typing "<|assistant|>" gets ordinary tokens). The leading `<|endoftext|>` is the
separator the model saw before every pretraining document, so a conversation starts from the same
state as a fresh document.

The assistant mask is True exactly on the tokens the model should learn to produce: the content
of each assistant message and the `<|end|>` that closes it (so the model learns to stop). Role
headers, system and user turns are never trained on.

`HF_CHAT_TEMPLATE` is the same template as a Jinja string for a Hugging Face `chat_template`.

Not for tokenization itself (see `scratchlm.tokenizer`) or for generation (see `scratchlm.infer`).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from scratchlm.errors import UserError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_TOKEN = "<|end|>"
EOT_TOKEN = "<|endoftext|>"
CHAT_SPECIAL_TOKENS = (ROLE_TOKENS["system"], ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], END_TOKEN)

# The same rendering for Hugging Face `tokenizer.apply_chat_template` (special tokens must be
# registered as added tokens of the exported tokenizer, which `tokenizer.export_hf` does).
HF_CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class RenderedChat(NamedTuple):
    """Token ids of a conversation and, per token, whether it is an assistant (trained) token."""

    ids: list[int]
    assistant_mask: list[bool]


def has_chat_tokens(tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_SPECIAL_TOKENS)


def add_chat_tokens(tokenizer) -> list[str]:
    """Give the tokenizer the chat special tokens it lacks; returns the ones added (in order)."""
    missing = [t for t in CHAT_SPECIAL_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing


def chat_stop_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn during generation: `<|end|>`, and `<|endoftext|>`."""
    ids = [_special_id(tokenizer, END_TOKEN)]
    if EOT_TOKEN in tokenizer.special_tokens:
        ids.append(tokenizer.special_tokens[EOT_TOKEN])
    return ids


def validate_messages(messages, where: str = "messages") -> list[dict]:
    """Check a message list's shape; a UserError names `where` and the bad message's index."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}[{i}]: a message must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}].content: expected a string")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(
    tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    train_from_message: int = 0,
) -> RenderedChat:
    """Render `messages` to ids and the assistant mask.

    `add_generation_prompt` appends the `<|assistant|>` header so a model continues as the
    assistant (inference). Only assistant messages at index >= `train_from_message` are marked
    (DPO marks only the response, not assistant turns inside the prompt).
    """
    messages = validate_messages(list(messages))
    if not has_chat_tokens(tokenizer):
        raise UserError(
            "this tokenizer has no chat tokens (" + ", ".join(CHAT_SPECIAL_TOKENS) + "); "
            "the model was not fine-tuned for chat (run `scratchlm sft` first)"
        )
    end_id = _special_id(tokenizer, END_TOKEN)
    ids: list[int] = []
    mask: list[bool] = []
    if EOT_TOKEN in tokenizer.special_tokens:
        _extend(ids, mask, [tokenizer.special_tokens[EOT_TOKEN]], False)
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant" and index >= train_from_message
        _extend(ids, mask, [_special_id(tokenizer, ROLE_TOKENS[message["role"]])], False)
        # Plain-text encoding: special-token strings inside content stay ordinary text.
        _extend(ids, mask, tokenizer.encode(message["content"]), trained)
        _extend(ids, mask, [end_id], trained)
    if add_generation_prompt:
        _extend(ids, mask, [_special_id(tokenizer, ROLE_TOKENS["assistant"])], False)
    return RenderedChat(ids, mask)


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The template as a string (what `HF_CHAT_TEMPLATE` produces), for display and HF checks."""
    messages = validate_messages(list(messages))
    parts = [EOT_TOKEN]
    parts += [f"{ROLE_TOKENS[m['role']]}{m['content']}{END_TOKEN}" for m in messages]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def _extend(ids: list[int], mask: list[bool], new_ids: Iterable[int], trained: bool) -> None:
    new_ids = list(new_ids)
    ids.extend(new_ids)
    mask.extend([trained] * len(new_ids))


def _special_id(tokenizer, token: str) -> int:
    try:
        return tokenizer.special_tokens[token]
    except KeyError:
        raise UserError(f"tokenizer has no special token {token}") from None
