"""Options shared by several commands, and the flag that gives each library setting
(a ``UserError``'s ``setting``) so an error can name it."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.planning.method_table import method_help
from lsaq_mlx.quantizers import quantizer_help
from lsaq_mlx.sources.resolve import source_help

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help=source_help(),
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output that lsaq-mlx wrote.")]

# ---- planning ----
BudgetsOption = Annotated[list[float], typer.Option("--bits-budget", "-b", metavar="BITS", help="Bits per weight (mlx-lm's definition, scales included); repeat for several plans.")]
BudgetOption = Annotated[Optional[float], typer.Option("--bits-budget", "-b", metavar="BITS", help="Bits per weight (mlx-lm's definition, scales included).")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory-budget", metavar="SIZE", help="Total memory for the model, e.g. 1.2GB: weights get what a --context KV cache (float16) and a 10 % runtime reserve leave.")]
RecipeOption = Annotated[Optional[str], typer.Option(metavar="RECIPE", help="Instead of a method: mlx-lm's mixed_2_6 | mixed_3_4 | mixed_3_6 | mixed_4_6.")]
ScoresOption = Annotated[Optional[Path], typer.Option(metavar="FILE", help="LayerScores JSON to use (from score --out); default: computed and cached.")]
CalibOption = Annotated[Optional[str], typer.Option(metavar="FILE", help="Calibration text for the scores and the cost model (default: packaged).")]
HighBitsOption = Annotated[int, typer.Option(metavar="BITS", help="Tiers: bits of the important layers.")]
LowBitsOption = Annotated[int, typer.Option(metavar="BITS", help="Tiers: bits of the other layers, embeddings and LM head.")]
GroupSizeOption = Annotated[Optional[int], typer.Option(metavar="N", help="Tiers/uniform/recipe: group size (default 64).")]
UniformBitsOption = Annotated[Optional[int], typer.Option(metavar="BITS", help="Uniform: this bit width (no budget needed).")]
OverrideOption = Annotated[Optional[list[str]], typer.Option(metavar="REGEX=SETTING", help="Pin modules: REGEX=BITS[:GROUP], REGEX=keep or REGEX=swsc:K:R (repeatable).")]
CodecsOption = Annotated[str, typer.Option(metavar="CODECS", help="affine (stock mlx-lm opens the result), with any of: mxfp4, nvfp4, mxfp8 (MLX's microscaling float formats, also stock; chosen per module only where they cost less per byte) and swsc (shared channel weights + SVD correction; opens with lsaq-mlx only). E.g. affine,nvfp4,mxfp4.")]
ContextOption = Annotated[int, typer.Option(metavar="TOKENS", help="Tokens of KV cache a --memory-budget reserves.")]
QuantizerOption = Annotated[Optional[str], typer.Option("--quantizer", metavar="NAME", help=quantizer_help())]
MethodOption = Annotated[str, typer.Option("--method", metavar="METHOD", help=method_help())]

# ---- runtime ----
StartBudgetOption = Annotated[Optional[float], typer.Option("--bits-budget", "-b", metavar="BITS", help="Start with the plan of this many bits per weight (default: the source precision; an adaptive folder: its plan of this budget, or the largest below).")]
AutoOption = Annotated[bool, typer.Option("--auto", metavar="", help="Follow this machine's memory: swap between plans of --budgets.")]
TraceOption = Annotated[Optional[Path], typer.Option(metavar="FILE", help="Follow a replayed memory trace instead (one 'available[,pressure]' per line, one line per second).")]
PlanBudgetsOption = Annotated[str, typer.Option("--budgets", metavar="BITS,BITS,...", help="Automatic mode: the plans' bits per weight (an adaptive folder moves through its own plans).")]
ReserveOption = Annotated[str, typer.Option(metavar="SIZE", help="Automatic mode: memory to keep free.")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", "-n", min=1, metavar="TOKENS", help="Longest reply, in tokens.")]
SystemOption = Annotated[Optional[str], typer.Option("--system-prompt", "--system", metavar="TEXT", help="System prompt.")]
TempOption = Annotated[float, typer.Option("--temp", metavar="T", help="Sampling temperature; 0 picks the most likely token.")]
TopPOption = Annotated[float, typer.Option("--top-p", metavar="P", help="Sample from the smallest set of tokens whose probability reaches P (1: off).")]
TopKOption = Annotated[int, typer.Option("--top-k", metavar="K", help="Sample from the K most likely tokens only (0: off).")]
MinPOption = Annotated[float, typer.Option("--min-p", metavar="P", help="Drop tokens less likely than P x the most likely one (0: off).")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Random seed, for replies that repeat.")]
MaxKVOption = Annotated[Optional[int], typer.Option("--max-kv-size", metavar="TOKENS", help="Keep at most this many tokens in the KV cache (a rotating cache); default: the whole conversation.")]

PlanFileOption = Annotated[Optional[Path], typer.Option("--plan", metavar="FILE", help="Run this plan, its precision fixed: a QuantPlan (plan -o), or a PipelinePlan (plan --ranks), which under mlx.launch runs pipelined: rank 0 talks to you, every rank holds its own layers.")]
RankTimeoutOption = Annotated[float, typer.Option("--rank-timeout", metavar="SECONDS", min=1.0, help="Pipelined: end the session when a step waits this long on another rank (stalled or dead).")]
ChatTemplateOption = Annotated[Optional[str], typer.Option("--chat-template", metavar="TEMPLATE|FILE", help="A Jinja chat template (or a file holding one) in place of the model's, as mlx_lm.server's --chat-template.")]
ChatTemplateArgsOption = Annotated[Optional[str], typer.Option("--chat-template-args", metavar="JSON", help="Names the chat template reads, as a JSON object (e.g. '{\"enable_thinking\": false}'); a request's chat_template_kwargs add to them.")]

FLAGS = {
    "bits_budget": "--bits-budget", "memory_budget": "--memory-budget", "budget": "--bits-budget or --memory-budget",
    "method": "--method", "recipe": "--recipe", "override": "--override", "codecs": "--codecs",
    "tier_bits": "--high-bits/--low-bits", "force": "--force", "ppl": "--ppl", "data_dir": "--data-dir", "host": "--host", "port": "--port",
    "temp": "--temp", "top_p": "--top-p", "min_p": "--min-p", "max_kv_size": "--max-kv-size", "older_than": "--older-than",
    "tokens": "--tokens", "seq_len": "--seq-len", "top_k": "--top-k", "sets": "--sets", "bits": "--bits",
    "metric": "--metric", "budgets": "--budgets", "auto": "--auto or --memory-trace", "chat": "--chat",
    "importance": "--importance", "max_tokens": "--max-tokens", "reserve": "--reserve", "seed": "--seed",
    "high_bits": "--high-bits", "low_bits": "--low-bits", "group_size": "--group-size", "context": "--context",
    "low_fraction": "--low-fraction", "plan": "--plan", "ranks": "--ranks", "chat_template": "--chat-template",
    "chat_template_args": "--chat-template-args", "limit": "--limit", "log_level": "--log-level", "reference": "--reference",
}
