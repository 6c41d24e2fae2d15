"""The chat's conversation: its messages, and the prompt they make within the model's context."""

from lsaq_mlx.errors import UserError


class Conversation:
    def __init__(self):
        self.messages: list[dict] = []

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def take_back(self) -> None:
        """Forget the message just asked (its reply failed): the conversation is as before it."""
        self.messages.pop()

    def set_system(self, text: str) -> None:
        self.messages = [{"role": "system", "content": text}] + [m for m in self.messages if m["role"] != "system"]

    def reset(self) -> None:
        """Forget everything but the system prompt."""
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def retract(self) -> None:
        """Forget the last user message and what followed it (a reply stopped to edit the prompt)."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last is not None:
            self.messages = self.messages[:last]

    def prompt(self, tokenizer, context: int, template_args: dict | None = None) -> tuple[list[int], int]:
        """``(tokens, dropped)``: the prompt of the conversation; when it does not fit
        ``context``, the oldest exchanges are dropped (system prompt and the new message
        stay); a message that alone does not fit is refused."""
        tokens, dropped = self._tokens(tokenizer, template_args), 0
        while len(tokens) >= context:
            older = [i for i, m in enumerate(self.messages[:-1]) if m["role"] != "system"]
            if not older:
                raise UserError(f"the message is {len(tokens)} tokens with the system prompt; the model's context "
                                f"holds {context}")
            del self.messages[older[0]]
            dropped += 1
            tokens = self._tokens(tokenizer, template_args)
        return tokens, dropped

    def _tokens(self, tokenizer, template_args: dict | None = None) -> list[int]:
        if tokenizer.chat_template:
            return list(tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, **(template_args or {})))
        return tokenizer.encode("\n".join(m["content"] for m in self.messages))
