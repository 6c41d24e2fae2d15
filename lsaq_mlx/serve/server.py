"""An OpenAI-compatible HTTP server on the engine (``lsaq-mlx serve``).

The standard library's ``ThreadingHTTPServer`` parses HTTP; each request thread turns
its body into a ``Completion`` and queues it on the one engine thread, which decodes the
queued ones together and applies plan swaps between tokens. A client that disconnects cancels its
completion at once, whether it is running or still waiting.
"""

import hmac
import json
import logging
import queue
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lsaq_mlx import __version__
from lsaq_mlx.runtime.completion import Completion
from lsaq_mlx.runtime.tool_calls import ToolCallText
from lsaq_mlx.serve.requests import MAX_BODY_BYTES, ApiError, CompletionRequest, completion_request, parse_body
from lsaq_mlx.serve.status import ServerStatus

POLL_SECONDS = 0.1  # how often a waiting request looks for its client having left
log = logging.getLogger("lsaq_mlx.serve")


class ClientGone(Exception):
    pass


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: socketserver's 5 resets a burst of clients

    def __init__(self, address, engine, model_id: str, api_key: str | None = None, max_tokens: int = 512,
                 defaults=None, allowed_origins: tuple[str, ...] = ()):
        """``allowed_origins``: the web pages (``https://host:port``, or ``*``) whose scripts
        may call this server from a browser (CORS); none by default, so no page the user
        happens to visit can use a model on their machine."""
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ApiHandler)
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.allowed_origins = tuple(allowed_origins)
        self.max_tokens, self.defaults = max_tokens, defaults
        self.status = ServerStatus(engine, model_id).start()
        self.info = engine.info  # context, vocabulary: the engine owns the tokenizer and tokenizes prompts

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class ApiHandler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = f"lsaq-mlx/{__version__}"
    timeout = 60  # seconds a client may take to send its request

    def log_message(self, format, *args) -> None:  # socketserver's own lines; requests: log_request
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:
        """One line a request, at --log-level info: who, what, the status, how long."""
        took = time.monotonic() - getattr(self, "_started", time.monotonic())
        log.info('%s "%s" %s %.3f s', self.address_string(), self.requestline, code, took)

    def parse_request(self) -> bool:
        self._started = time.monotonic()
        return super().parse_request()

    def end_headers(self) -> None:
        origin = self._allowed_origin()
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _allowed_origin(self) -> str | None:
        headers = getattr(self, "headers", None)  # none yet when the request line itself is refused
        origin, allowed = headers.get("Origin") if headers else None, self.server.allowed_origins
        if origin is None or not allowed:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    def do_OPTIONS(self) -> None:
        """A browser's CORS preflight: allowed origins learn what they may send."""
        self.send_response(204 if self._allowed_origin() else 403)
        if self._allowed_origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # ---- routing ----
    def do_GET(self) -> None:
        self._route({"/v1/models": self._models, "/v1/status": self._status, "/health": self._health})

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": lambda: self._complete(chat=True),
                     "/v1/completions": lambda: self._complete(chat=False)})

    def do_PUT(self) -> None:
        self._route({})

    do_DELETE = do_PATCH = do_PUT

    def _route(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path != "/health":
                self._authorize()
            if path.startswith("/v1/models/") and self.command == "GET":
                return self._model(path.removeprefix("/v1/models/"))
            handler = routes.get(path)
            if handler is None:
                known = path in ("/v1/models", "/v1/status", "/health", "/v1/chat/completions", "/v1/completions")
                raise ApiError(405 if known else 404, f"{self.command} {path} is not served here",
                               code="method_not_allowed" if known else "not_found")
            handler()
        except ApiError as e:
            self.close_connection = True  # a body left unread must not be taken for the next request
            self._send_json(e.status, e.body())
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # a bug must fail this request, not leave the client without a reply
            self.close_connection = True
            self._send_json(500, ApiError(500, f"the server failed: {type(e).__name__}: {e}",
                                          kind="server_error").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")

    # ---- endpoints ----
    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _model_entry(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": int(self.server.status.started),
                "owned_by": "lsaq-mlx"}

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._model_entry()]})

    def _model(self, name: str) -> None:
        self._check_model(name)
        self._send_json(200, self._model_entry())

    def _check_model(self, name: str | None) -> None:
        """A request may leave ``model`` out, or name the model served: its ``--model``
        spelling or that path's last part (``Llama-3-8B`` for ``./models/Llama-3-8B``)."""
        served = self.server.model_id
        if name in (None, "", served, served.rstrip("/").rsplit("/", 1)[-1]):
            return
        raise ApiError(404, f"model '{name}' is not served here (this server serves '{served}')", "model",
                       "model_not_found")

    def _status(self) -> None:
        self._send_json(200, self.server.status.snapshot())

    def _complete(self, chat: bool) -> None:
        request = completion_request(self._body(), chat, self.server.max_tokens, self.server.defaults,
                                     self.server.info.vocabulary)
        self._check_model(request.model)
        job = Completion([], request.max_tokens, request.sampling, request.stop, request.logits,
                         prompt=request.prompt, messages=request.messages, logprobs=request.logprobs,
                         tools=request.tools, template_kwargs=request.template_kwargs)
        status = self.server.status
        status.count("in_flight")
        self.server.engine.complete(job)
        try:
            ok = (self._stream if request.stream else self._respond)(job, request)
            status.count("served" if ok else "failed")
        except ClientGone:
            job.cancel()
            status.count("cancelled")
            raise
        except ApiError:
            status.count("failed")
            raise
        finally:
            status.count("in_flight", -1)

    def _body(self) -> dict:
        """The JSON body, framed by exactly one Content-Length of ASCII digits."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(411, "chunked request bodies are not accepted: send a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            raise ApiError(411 if not lengths else 400, "the request needs exactly one Content-Length of digits")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientGone
        return parse_body(body)

    # ---- replies ----
    def _respond(self, job: Completion, request: CompletionRequest) -> bool:
        pieces, logprobs, done = [], [], None
        for event in self._events(job):
            if event.kind == "text":
                pieces.append(event.text)
                logprobs += event.logprobs
            elif event.kind == "done":
                done = event
        text, reply = "".join(pieces), _reply_header(request, self.server.model_id)
        shown = _logprobs(logprobs, request) if request.logprobs is not None else None
        calls = self._tool_text(request)
        if calls:
            before = calls.feed(text)
            rest, calls = calls.finish(request.tools)
            text = before + rest
        if request.chat:
            message = {"role": "assistant", "content": text if text or not calls else None}
            choice = {"index": 0, "message": message | ({"tool_calls": calls} if calls else {}), "logprobs": shown}
        else:
            choice = {"index": 0, "text": text, "logprobs": shown}
        choice["finish_reason"] = "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason
        reply |= {"object": "chat.completion" if request.chat else "text_completion", "choices": [choice],
                  "usage": done.usage, "lsaq_mlx": done.info}
        self._send_json(200, reply)
        return True

    def _stream(self, job: Completion, request: CompletionRequest) -> bool:
        """Server-sent events; False when the engine failed mid-stream (said in the stream).
        The headers wait for the engine to accept the prompt, so a prompt it refuses is a 400."""
        events = self._events(job)
        next(events)  # "started", or the ApiError of a refused prompt
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        header = _reply_header(request, self.server.model_id) | {
            "object": "chat.completion.chunk" if request.chat else "text_completion"}

        def chunk(text: str | None, finish_reason=None, first=False, logprobs=()) -> dict:
            shown = _logprobs(list(logprobs), request) if request.logprobs is not None and logprobs else None
            if request.chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": shown, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": shown, "finish_reason": finish_reason}
            return header | {"choices": [choice]}

        if request.chat:
            self._send_event(chunk(None, first=True))
        calls = self._tool_text(request)
        try:
            for event in events:
                if event.kind == "text":
                    text = calls.feed(event.text) if calls else event.text
                    if text or event.logprobs:
                        self._send_event(chunk(text, logprobs=event.logprobs))
                elif event.kind == "done":
                    reason = event.finish_reason
                    if calls:
                        rest, made = calls.finish(request.tools)
                        if rest:
                            self._send_event(chunk(rest))
                        if made:
                            self._send_event(header | {"choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                                                    "delta": {"tool_calls": [c | {"index": i} for i, c in enumerate(made)]}}]})
                            reason = "tool_calls" if reason == "stop" else reason
                    self._send_event(chunk(None, reason) | {"lsaq_mlx": event.info})
                    if request.include_usage:
                        self._send_event(header | {"choices": [], "usage": event.usage})
        except ApiError as e:  # the headers are sent: the failure goes in the stream
            self._send_event(e.body())
            return False
        self._write(b"data: [DONE]\n\n")
        return True

    def _tool_text(self, request: CompletionRequest):
        """A splitter of tool calls from the reply, when the request has tools."""
        calling = getattr(self.server.info, "tool_calling", None)
        return ToolCallText(calling) if request.tools and calling else None

    def _events(self, job: Completion):
        """The completion's events until it is done; ``ClientGone`` when the client left;
        an engine failure ends the reply with a 500 (or an error event in a stream)."""
        looked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                event = None
            if event is None or time.monotonic() - looked >= POLL_SECONDS:  # also while tokens flow
                looked = time.monotonic()
                if self._client_gone():
                    raise ClientGone from None
            if event is None:
                if not self.server.engine.running():
                    raise ApiError(503, "the engine has stopped", kind="server_error")
                continue
            if event.kind == "error":
                raise ApiError(event.status, event.text, event.param, event.code,
                               "server_error" if event.status >= 500 else "invalid_request_error")
            yield event
            if event.kind == "done":
                return

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send_event(self, data: dict) -> None:
        self._write(b"data: " + json.dumps(data).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise ClientGone from None

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:  # or a client that keeps connections would reuse this one
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


def _logprobs(entries: list[dict], request: CompletionRequest) -> dict:
    """OpenAI's ``logprobs`` of a choice: ``{"content": [...]}`` for chat, the legacy
    ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` lists for completions."""
    if request.chat:
        def one(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, v) for t, v in e["top"]]}
                            for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            # tokens that decode alike (parts of one character) share a key: the likeliest keeps it
            "top_logprobs": [dict(reversed(e["top"])) for e in entries], "text_offset": offsets}


def _reply_header(request: CompletionRequest, model_id: str) -> dict:
    prefix = "chatcmpl" if request.chat else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}
