"""``lsaq-mlx chat``: a terminal chat on the runtime engine.

On a terminal: readline editing and history, streamed replies, Ctrl-C stops a reply
(a second Ctrl-C, or one at the prompt, exits). With standard input not a terminal it is
scripted: one message or command per line, replies and statistics on stdout.
"""

import json
import queue
import signal
import sys
import time
from concurrent.futures import Future
from pathlib import Path

from lsaq_mlx.cache import atomic_file, cache_dir
from lsaq_mlx.errors import UserError, os_error_line
from lsaq_mlx.sizes import format_size
from lsaq_mlx.runtime.commands import EngineStopped
from lsaq_mlx.runtime.text import valid_text
from lsaq_mlx.runtime.events import EngineError, EngineProtocol, Note, Ready, ReplyDone, StateUpdate, Swapped, Token

HELP = """a message of several lines: start and end it with three double quotes (\"\"\")
commands:
  /plan B        switch to a plan of B bits per weight (hot swap, the conversation goes on)
  /auto on|off   follow the machine's memory (needs --auto or --memory-trace)
  /stats [json]  plan, memory, last reply's speed (json: everything the engine reports)
  /layers        every module's bits/group size, layer by layer
  /system TEXT   set the system prompt
  /reset         forget the conversation
  /save FILE     write the conversation as JSON (/save --force FILE replaces a file)
  /help          this text
  /quit          leave"""


BLOCK = '"""'  # opens and closes a message of several lines
QUIT_WINDOW = 3.0  # seconds in which a second Ctrl-C at the prompt leaves
POLL_SECONDS = 0.05  # how long a wait for a reply looks for more events before it checks the reply


class ChatSession:
    def __init__(self, engine: EngineProtocol, max_tokens: int, out=None, status=None):
        """Replies and what commands show go to ``out``; the bracketed status lines (reply
        statistics, swaps, notes, errors) to ``status`` (default ``out``; stderr when the
        chat is scripted, so stdout holds only replies, as ``generate`` does)."""
        self.engine, self.max_tokens, self.out = engine, max_tokens, out or sys.stdout
        self.status = status or self.out
        self.generating = False
        self.block: list[str] | None = None  # the lines of a BLOCK being typed

    def print(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def say(self, text: str) -> None:
        """A status line, on a line of its own."""
        print(text, file=self.status, flush=True)

    def wait(self, *kinds: type):
        """Print events until one of the classes ``kinds`` (or an error) arrives; return it."""
        while True:
            event = self.engine.events.get()
            self._show(event)
            if isinstance(event, (*kinds, EngineError)):
                return event

    def wait_for(self, reply: Future):
        """Print events until ``reply`` (a command's) is answered and every event before its
        answer is shown; the answer, or None when the command failed (an error event said why)."""
        while True:
            try:
                event = self.engine.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if reply.done():
                    return None if reply.exception() else reply.result()
                continue
            self._show(event)

    def _show(self, event) -> None:
        if isinstance(event, Token):
            self.print(event.text, end="")
        elif isinstance(event, Swapped):
            failed = event.failed
            kept = f"; {len(failed)} failed, kept their old weights: {next(iter(failed.values()))}" if failed else ""
            self.say(("\n" if self.status is self.out else "")  # it may land within a reply's line
                     + f"[swapped {event.changed} modules in {event.seconds:.2f} s -> "
                       f"{_bpw(event.state.bits_per_weight)}{kept}]")
        elif isinstance(event, Note):
            self.say(f"[note: {event.message}]")
        elif isinstance(event, EngineError):
            if event.fatal:
                raise EngineStopped(event.message)
            self.say(f"[error: {event.message}]")

    def handle(self, line: str) -> bool:
        """Run one input line; False means leave. A command that fails is reported and
        the chat goes on (only the engine stopping ends it)."""
        try:
            line = self._unblocked(valid_text(line))
            return True if line is None else self._handle(line)
        except OSError as e:
            self.say(f"[error: {os_error_line(e)}]")
        except EngineStopped:
            raise
        except UserError as e:
            self.say(f"[error: {e}]")
        return True

    def _unblocked(self, line: str) -> str | None:
        """Ollama's messages of several lines: from a line that starts with ``BLOCK`` to one
        that ends with it, one message; None while the block is open."""
        text = line.rstrip("\n")
        if self.block is None:
            if not text.lstrip().startswith(BLOCK):
                return line
            text = text.lstrip()[len(BLOCK):]
            if text.rstrip().endswith(BLOCK):  # """one line"""
                return text.rstrip()[: -len(BLOCK)]
            self.block = [text] if text.strip() else []
            return None
        if text.rstrip().endswith(BLOCK):
            message = "\n".join([*self.block, text.rstrip()[: -len(BLOCK)]])
            self.block = None
            return message
        self.block.append(text)
        return None

    def _handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.generating = True
            event = self.wait_for(self.engine.chat(line, self.max_tokens))
            self.generating = False
            if isinstance(event, ReplyDone):
                d = event.stats
                self.print()  # the reply's line ends
                self.say(f"[{d.generation_tokens} tokens · {d.generation_tps:.1f} tok/s · prompt "
                         f"{d.prompt_tokens} at {d.prompt_tps:.1f} tok/s · peak memory "
                         f"{d.peak_memory_bytes / 1e9:.2f} GB · {_bpw(d.bits_per_weight)}{' · stopped' if d.stopped else ''}]")
            return True
        command, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if command in ("quit", "exit"):
            return False
        if command == "help":
            self.print(HELP)
        elif command == "plan":
            try:
                budget = float(arg)
            except ValueError:
                self.print("[usage: /plan BITS_PER_WEIGHT, e.g. /plan 3.5]")
                return True
            self.wait_for(self.engine.apply_budget(budget))
        elif command == "auto" and arg in ("on", "off"):
            event = self.wait_for(self.engine.set_auto(arg == "on"))
            if isinstance(event, StateUpdate):
                self.print(f"[auto: {'on' if event.state.auto else 'off'}]")
        elif command in ("stats", "layers"):
            event = self.wait_for(self.engine.request_state())
            if isinstance(event, StateUpdate):
                state = event.state
                if command == "layers":
                    self.print(_layers(state.layers))
                elif arg == "json":
                    self.print(json.dumps(state.to_dict(), indent=2, default=str))
                else:
                    self.print(stats_summary(state))
        elif command == "system":
            if not arg:
                self.print("[usage: /system TEXT, e.g. /system You answer in French.]")
                return True
            if self.wait_for(self.engine.set_system(arg)):
                self.print("[system prompt set]")
        elif command == "reset":
            if self.wait_for(self.engine.reset()):
                self.print("[conversation reset]")
        elif command == "save":
            self._save(arg)
        else:
            self.print(f"[unknown command '{line}'; /help lists them]")
        return True


    def _save(self, arg: str) -> None:
        force = arg.startswith("--force ")
        path = arg.removeprefix("--force ").strip()
        if not path:
            self.print("[usage: /save FILE, or /save --force FILE to replace one]")
            return
        messages = list(self.engine.messages)
        if not force and Path(path).exists():
            self.print(f"[{path} exists: /save --force {path} replaces it]")
            return
        with atomic_file(Path(path), force, make_folders=False) as tmp:
            tmp.write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.print(f"[saved {len(messages)} messages to {path}]")


def banner(state, model: str, sampling: str) -> str:
    """The first line of a chat: the model, its precision and memory, how it samples."""
    return (f"lsaq-mlx chat · {model} · {_bpw(state.bits_per_weight)} ({state.method}) · weights "
            f"{format_size(state.weight_bytes)} · {sampling} · /help lists the commands")


def stats_summary(state) -> str:
    """``/stats``: the engine's state in a few lines."""
    lines = [f"plan: {state.method}, {_bpw(state.bits_per_weight)}, weights {format_size(state.weight_bytes)}"
             + (f", plan {state.plan_index + 1} of the set" if state.plan_index is not None else "")
             + f"; automatic mode {'on' if state.auto else 'off'}"]
    mem = state.memory
    if mem:
        lines.append(f"memory: {format_size(mem['available_bytes'])} available of {format_size(mem['total_bytes'])}"
                     f" ({mem['pressure']}); this process {format_size(mem.get('rss_bytes', 0))}")
    lines.append(f"MLX: {format_size(state.mlx_active_bytes)} active, peak {format_size(state.mlx_peak_bytes)}; "
                 f"conversation {state.messages} messages, {state.cached_tokens} tokens cached")
    for rank in getattr(state, "ranks", None) or []:
        first, end = rank["layers"]
        plan = (f", plan {rank['plan_index'] + 1} of {rank['plans']}, {rank['swaps']} swaps"
                if rank.get("plan_index") is not None else "")
        lines.append(f"rank {rank['rank']}: layers {first}-{end - 1}, {_bpw(rank['bits_per_weight'])}, weights "
                     f"{format_size(rank['weight_bytes'])}{plan}; MLX {format_size(rank['mlx_active_bytes'])} active; "
                     f"RSS {format_size(rank['rss_bytes'])}; {format_size(rank['available_bytes'])} available")
    r = state.last_reply
    if r:
        lines.append(f"last reply: {r['generation_tokens']} tokens at {r['generation_tps']:.1f} tok/s, prompt "
                     f"{r['prompt_tokens']} at {r['prompt_tps']:.1f} tok/s, first token after "
                     f"{r['first_token_seconds']:.2f} s")
    return "\n".join(lines)


def _bpw(bits_per_weight: float | None) -> str:
    return f"{bits_per_weight:.2f} bits/weight" if bits_per_weight else "bits/weight unknown"


def _layers(layers: dict) -> str:
    if not layers:
        return "[all layers at source precision]"
    keys = sorted(layers, key=lambda k: (k == "rest", int(k) if k != "rest" else 0))
    return "\n".join(f"{k:>5}: " + " · ".join(f"{m.rpartition('.')[2]} {c}" for m, c in layers[k].items()) for k in keys)


def run_chat(engine: EngineProtocol, max_tokens: int, stdin=None, title=None, first: str | None = None) -> None:
    """Talk to ``engine``; ``title(state)``: the banner, from the engine's state when it
    is ready (on stderr when scripted, so stdout holds only the replies); ``first``: a
    message sent before anything is read."""
    stdin = stdin or sys.stdin
    if hasattr(stdin, "reconfigure"):  # undecodable bytes reach valid_text, not a traceback
        stdin.reconfigure(errors="surrogateescape")
    session = ChatSession(engine, max_tokens, status=None if stdin.isatty() else sys.stderr)
    if title:
        ready = session.wait(Ready)
        if isinstance(ready, Ready):
            print(title(ready.state), file=session.out if stdin.isatty() else sys.stderr, flush=True)
    if first is not None and not session.handle(first):
        return
    if not stdin.isatty():
        for line in stdin:
            if not session.handle(line):
                break
        return
    import readline

    history = cache_dir() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(str(history))
    except OSError:  # an unreadable history costs only the history
        pass
    interrupts = {"count": 0}

    def on_interrupt(signum, frame):
        if session.generating and interrupts["count"] == 0:
            interrupts["count"] += 1
            engine.stop()
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    session.print("lsaq-mlx chat: /help lists commands, Ctrl-C stops a reply, Ctrl-C twice or Ctrl-D leaves")
    last_interrupt = float("-inf")
    try:
        while True:
            interrupts["count"] = 0
            try:
                line = input("> ")
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt: a second one within QUIT_WINDOW leaves
                if time.monotonic() - last_interrupt <= QUIT_WINDOW:
                    session.print()
                    break
                last_interrupt = time.monotonic()
                session.print("\n(Ctrl-C again or Ctrl-D leaves)")
                continue
            if not session.handle(line):
                break
    except KeyboardInterrupt:  # a second Ctrl-C while a reply streams
        session.print()
    finally:
        signal.signal(signal.SIGINT, previous)
        try:
            readline.write_history_file(str(history))
        except OSError:
            pass
