"""``serve``: an OpenAI-compatible HTTP server whose model keeps fitting the machine's memory."""

import ipaddress
import logging
import socket
from typing import Annotated, Optional

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import (
    ChatTemplateArgsOption,
    ChatTemplateOption,
    PlanFileOption,
    RankTimeoutOption,
    AutoOption,
    MaxKVOption,
    MaxTokensOption,
    MethodOption,
    MinPOption,
    ModelOption,
    PlanBudgetsOption,
    ReserveOption,
    SeedOption,
    StartBudgetOption,
    TempOption,
    TopKOption,
    TopPOption,
    TraceOption,
)
from lsaq_mlx.cli.output import err
from lsaq_mlx.errors import UserError


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on; only loopback unless --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="PORT", help="TCP port (0: any free port).")] = 8080,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", metavar="", help="Allow a --host other machines can reach (use --api-key).")] = False,
    api_key: Annotated[Optional[str], typer.Option(metavar="KEY", envvar="LSAQ_MLX_API_KEY", help="Require 'Authorization: Bearer KEY' on every /v1 request.")] = None,
    bits_budget: StartBudgetOption = None,
    auto: AutoOption = False,
    memory_trace: TraceOption = None,
    budgets: PlanBudgetsOption = "3,3.5,4,4.5,5,6",
    method: MethodOption = "lsaq",
    reserve: ReserveOption = "512MB",
    max_tokens: MaxTokensOption = 512,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    min_p: MinPOption = 0.0,
    seed: SeedOption = None,
    max_kv_size: MaxKVOption = None,
    allowed_origins: Annotated[Optional[str], typer.Option("--allowed-origins", metavar="ORIGINS", help="Comma-separated web origins (e.g. http://localhost:3000, or *) whose pages may call the server from a browser (CORS); none by default.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="warning (default) | info: a line per request on stderr | debug")] = "warning",
    plan_file: PlanFileOption = None,
    rank_timeout: RankTimeoutOption = 60.0,
    chat_template: ChatTemplateOption = None,
    chat_template_args: ChatTemplateArgsOption = None,
) -> None:
    """Serve the model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models) and report its plan, memory and swaps at /v1/status. Concurrent requests are decoded together; swaps happen between tokens.

    --max-tokens, --temp, --top-p, --top-k, --min-p and --seed are the defaults of requests that do not set them.

    Examples: lsaq-mlx serve -m ./Llama-3-8B --auto · lsaq-mlx serve -b 4 --port 8081 · curl localhost:8080/v1/status"""
    from lsaq_mlx.cli.runtime import _options, end_session, session_engine
    from lsaq_mlx.sources import resolve_model

    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise UserError(f"{host} is reachable from other machines: pass --allow-remote (and --api-key) to listen there",
                        setting="host")
    if log_level not in LOG_LEVELS:
        raise UserError(f"the log level must be one of {', '.join(LOG_LEVELS)}, not '{log_level}'", setting="log_level")
    _log_to_stderr(log_level)
    origins = tuple(o.strip() for o in (allowed_origins or "").split(",") if o.strip())
    sampling = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_kv_size=max_kv_size)
    options = _options(bits_budget, auto, memory_trace, budgets, method, reserve, sampling, chat_template,
                       chat_template_args, memory_events=True)
    options.check()
    source = resolve_model(model)
    engine = session_engine(source, options, plan_file, rank_timeout)
    if engine is None:
        return
    engine.start()
    try:
        server = _bind(host, port, engine, source.spec or "default", api_key, max_tokens, options.sampling, origins)
        if remote:
            err(f"warning: listening on {host}, reachable from other machines"
                f"{'' if api_key else ' without an API key'}")
        err(f"serving {server.model_id} at {server.url} (status: {server.url}/status); Ctrl+C stops")
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        end_session(engine)


LOG_LEVELS = ("warning", "info", "debug")


def _log_to_stderr(level: str) -> None:
    log = logging.getLogger("lsaq_mlx.serve")
    log.setLevel(level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False


def _bind(host, port, engine, model_id, api_key, max_tokens, defaults, origins=()):
    from lsaq_mlx.serve.server import ApiServer

    try:
        return ApiServer((host, port), engine, model_id, api_key, max_tokens, defaults, origins)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}", setting="port") from None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise UserError(f"cannot resolve the host '{host}'", setting="host") from None
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
