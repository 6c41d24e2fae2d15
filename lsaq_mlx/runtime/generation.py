"""One-shot generation with speed and memory statistics (``lsaq-mlx generate``)."""

from dataclasses import asdict, dataclass

from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from lsaq_mlx.errors import UserError


@dataclass
class GenerationStats:
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_bytes: int
    finish_reason: str | None

    def line(self) -> str:
        return (
            f"{self.generation_tokens} tokens · {self.generation_tps:.1f} tok/s · "
            f"prompt {self.prompt_tokens} tokens at {self.prompt_tps:.1f} tok/s · "
            f"peak memory {self.peak_memory_bytes / 1e9:.2f} GB"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def build_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> str:
    """The text to feed the model: the raw prompt, or the chat template applied to it."""
    if not chat:
        return prompt
    if not tokenizer.chat_template:
        raise UserError("this model has no chat template to wrap the prompt in", setting="chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 64, sampler=None, on_text=None,
                  context: int | None = None):
    """Generate from ``prompt``; stream pieces to ``on_text``; return ``(text, stats)``.
    A prompt longer than ``context`` tokens (the model's) is refused."""
    n_prompt = len(tokenizer.encode(prompt))
    if context and n_prompt >= context:
        raise UserError(f"the prompt is {n_prompt} tokens; the model's context holds {context}")
    if context:
        max_tokens = min(max_tokens, context - n_prompt)
    pieces, last = [], None
    sampler = sampler or make_sampler(temp=0.0)
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        pieces.append(last.text)
        if on_text:
            on_text(last.text)
    stats = GenerationStats(
        last.prompt_tokens, last.prompt_tps, last.generation_tokens, last.generation_tps, int(last.peak_memory * 1e9), last.finish_reason
    )
    return "".join(pieces), stats
