"""Stage chat-cli: talk to a trained checkpoint in the terminal.

    python -m scripts.chat_cli                          # the most trained model there is
    python -m scripts.chat_cli -i sft -t 0.8 -k 50      # a given stage, sampling settings
    python -m scripts.chat_cli -i base -p "Hello" -t 0  # one question, answer on stdout, exit
    make chat-cli SOURCE=sft

Loads the newest checkpoint of ``BASE_DIR/<source>_checkpoints/`` (source base | mid | sft |
rl, or auto: the first of rl, sft, mid, base that exists) through ``nanochat.inference.engine`` and
streams each reply as it is generated, UTF-8 safe, control characters shown escaped.
Calculator calls are shown apart from the text, dimmed at a terminal (unless NO_COLOR is set):
``[python: 1+2][= 3]``. On CUDA the engine runs under bf16 autocast (``nanochat.runtime``);
elsewhere fp32.

Without ``-p`` it is a multi-turn chat: the conversation so far is the prompt (the oldest
turns are dropped when it outgrows the model's context), line editing and history through
readline (kept in ``BASE_DIR/logs/chat_history``), commands ``/clear``, ``/temperature X``,
``/help`` and ``/quit``; Ctrl-D quits, Ctrl-C stops the reply being written (not the program).
No checkpoint (or no tokenizer) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    add_checkpoint_arguments,
    base_dir,
    log,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_main,
)
from nanochat.inference.prompt_fit import PromptTooLong, fit_conversation

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512
HISTORY_FILE = "chat_history"  # under BASE_DIR/logs/
HISTORY_LENGTH = 1000
HELP = """commands:
  /clear          forget the conversation so far
  /temperature X  sampling temperature (0 = greedy); without X, show it
  /help           this list
  /quit           leave (Ctrl-D too); Ctrl-C stops a reply while it is written"""
DIM, RESET = "\033[2m", "\033[0m"
# Control characters a model may emit (bell, carriage return, escape sequences) are shown
# escaped, so a reply can not ring, overwrite lines or restyle the terminal.
VISIBLE = {c: f"\\x{c:02x}" for c in [*range(32), 127] if chr(c) not in "\n\t"}


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.chat_cli",
        description="Chat with a trained checkpoint in the terminal (stage chat-cli).",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("-p", "--prompt", help="ask one question, stream the answer, exit")
    parser.add_argument(
        "-t",
        "--temperature",
        type=non_negative_float,
        default=DEFAULT_TEMPERATURE,
        help=f"sampling temperature, 0 = greedy (default: {DEFAULT_TEMPERATURE})",
    )
    parser.add_argument(
        "-k",
        "--top-k",
        type=non_negative_int,
        default=DEFAULT_TOP_K,
        help=f"sample among the k likeliest tokens, 0 = all (default: {DEFAULT_TOP_K})",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        help="longest reply in tokens; the model's context may cut it shorter "
        f"(default: {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the first reply, +1 per reply (default: random)"
    )
    return parser


class Chat:
    """A conversation with one engine: prompt building, streaming display, history."""

    def __init__(self, engine, tokenizer, args, out=None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.args = args
        self.temperature = args.temperature
        self.messages: list[dict] = []
        self.replies = 0
        self.out = out or sys.stdout
        self.color = self.out.isatty() and not os.environ.get("NO_COLOR")

    # --- prompt --------------------------------------------------------------------------

    def fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """Drop the oldest exchanges until the prompt leaves room for a reply.

        Room wanted: max_tokens, at most half the context. UsageError when even the last
        user message alone does not fit.
        """
        try:
            fitted = fit_conversation(
                self.tokenizer, messages, self.engine.max_context, self.args.max_tokens
            )
        except PromptTooLong as exc:
            raise UsageError(
                f"the message is {exc.tokens} tokens with its markers; the model's context "
                f"holds {exc.context}"
            ) from None
        return messages[fitted.dropped :], fitted.tokens

    # --- one reply -----------------------------------------------------------------------

    def _marks(self, kind: str) -> tuple[str, str]:
        opening, closing = {"python": ("[python: ", "]"), "output": ("[= ", "]")}.get(
            kind, ("", "")
        )
        if self.color and kind != "text":
            return DIM + opening, closing + RESET
        return opening, closing

    def stream_reply(self, ids: list[int], parts: list[dict]) -> None:
        """Write the reply as it comes; collect it into ``parts`` (content parts, see
        ``merge_parts``), so a reply cut short by Ctrl-C is still there."""
        from nanochat.inference.engine import merge_parts

        seed = (
            random.SystemRandom().randrange(2**31)
            if self.args.seed is None
            else self.args.seed + self.replies
        )
        self.replies += 1
        events = self.engine.stream_events(
            ids,
            max_tokens=self.args.max_tokens,
            temperature=self.temperature,
            top_k=self.args.top_k or None,
            seed=seed,
        )
        kind = "text"
        try:
            for piece_kind, text in events:
                if piece_kind != kind:
                    self.out.write(self._marks(kind)[1] + self._marks(piece_kind)[0])
                    kind = piece_kind
                merge_parts(parts, kind, text)
                self.out.write(text.translate(VISIBLE))
                self.out.flush()
        finally:
            events.close()
            self.out.write(self._marks(kind)[1])
            self.out.flush()

    @staticmethod
    def assistant_message(parts: list[dict]) -> dict:
        if all(part["type"] == "text" for part in parts):
            return {"role": "assistant", "content": "".join(part["text"] for part in parts)}
        return {"role": "assistant", "content": parts}

    def ask(self, text: str) -> None:
        """One exchange of the multi-turn chat; Ctrl-C ends the reply early."""
        try:
            messages, ids = self.fit([*self.messages, {"role": "user", "content": text}])
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        if len(messages) < len(self.messages) + 1:
            print("(the oldest turns were dropped to fit the context)", file=sys.stderr)
        parts: list[dict] = []
        if self.color:
            self.out.write(DIM + "assistant> " + RESET)
        try:
            self.stream_reply(ids, parts)
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        self.messages = [*messages, self.assistant_message(parts)]

    # --- commands ------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.messages = []
            self.say("(conversation cleared)")
        elif name == "/temperature":
            if rest:
                try:
                    self.temperature = non_negative_float(rest)
                except argparse.ArgumentTypeError as exc:
                    self.say(f"/temperature: {exc}")
                    return True
            self.say(f"(temperature {self.temperature:g})")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _readline(history: Path):
    """readline with a persistent history, at a terminal; None when unavailable."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LENGTH)
    return readline


NO_INPUT = (
    "no input: chat-cli reads your messages from a terminal (docker: make chat-cli "
    "BACKEND=docker from a terminal runs it with -it) or from standard input, one per line; "
    "for one reply give a prompt: ARGS='-p \"Hello\"'"
)


def repl(chat: Chat, base: Path) -> int:
    """The multi-turn chat. Standard input that ends before any line (no terminal, nothing
    piped in: a container without -i) is an error, never a silent exit 0."""
    interactive = sys.stdin is not None and sys.stdin.isatty()
    history = base / "logs" / HISTORY_FILE
    readline = _readline(history) if interactive else None
    if interactive:
        print("Type a message; /help lists the commands, Ctrl-D quits.", file=sys.stderr)
    lines_read = 0
    try:
        while True:
            try:
                if sys.stdin is None:
                    raise EOFError
                line = input("you> " if interactive else "")
                lines_read += 1
            except EOFError:
                if interactive:
                    print()
                if not interactive and lines_read == 0:
                    print(f"error: {NO_INPUT}", file=sys.stderr, flush=True)
                    return 2
                return 0
            except KeyboardInterrupt:
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    return 0
                continue
            chat.ask(line)
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()

    from nanochat import runtime
    from nanochat.inference.engine import Engine, load_chat_model

    rt = runtime.start()
    model, tokenizer, meta = load_chat_model(base, args.source, rt.device, args.tag, args.step)
    engine = Engine(model, tokenizer)
    log(
        f"{meta['source']} model {meta['tag']} step {meta['step']} on {rt.device} "
        f"(context {engine.max_context} tokens)"
    )
    chat = Chat(engine, tokenizer, args)
    if args.prompt is None:
        return repl(chat, base)
    _, ids = chat.fit([{"role": "user", "content": args.prompt}])
    try:
        chat.stream_reply(ids, [])
    except KeyboardInterrupt:
        chat.say("")
        return 130
    chat.say("")
    return 0


if __name__ == "__main__":
    run_main(main)
