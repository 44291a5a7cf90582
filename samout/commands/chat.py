"""`samout chat RUN_DIR`: an interactive chat that keeps the conversation as a state."""

from __future__ import annotations

import argparse
import sys

from samout.chat.conversation import Conversation
from samout.commands import add_command
from samout.commands.generate import add_sampling_flags, sampling_kwargs
from samout.errors import SamoutError

HELP = """commands:
  /reset         start a new conversation (keeps the system prompt)
  /system TEXT   start a new conversation with this system prompt
  /save NAME     save the conversation: NAME.safetensors (state) + NAME.json (transcript)
  /load NAME     continue a saved conversation
  /help          this text
  /quit          leave (also Ctrl-D)"""


DESCRIPTION = (
    "Interactive chat with a model trained with --objective sft/dpo. The conversation is "
    "kept as the model's state (fixed-size for SamOut): each turn feeds only the new message, "
    "never the history. Reads messages from stdin (one per line), streams the replies. " + HELP
)


def register(subparsers) -> None:
    p = add_command(subparsers, "chat", "chat with a chat model (each turn feeds only the new message)",
                    DESCRIPTION, argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run or model directory with a chat tokenizer")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    chat = Conversation.load_run(args.run_dir, device=args.device, system=args.system, dtype=args.dtype,
                                 **sampling_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"samout chat: {args.run_dir} (/help for commands)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if command == "/quit":
                    break
                elif command == "/help":
                    print(HELP)
                elif command == "/reset":
                    chat.reset()
                    print("(new conversation)")
                elif command == "/system":
                    chat.reset(system=rest)
                    print("(new conversation " + ("with this system prompt)" if rest else "without one)"))
                elif command in ("/save", "/load"):
                    if not rest:
                        raise SamoutError(f"usage: {command} NAME")
                    if command == "/save":
                        tensors, _ = chat.save(rest)
                        size = tensors.stat().st_size
                        print(f"(saved {rest}.json and {rest}.safetensors, {size} bytes of state)")
                    else:
                        chat.load(rest)
                        print(f"(loaded {rest}: {chat.turns} turns, {chat.tokens_seen} tokens in the state)")
                else:
                    raise SamoutError(f"unknown command {command} (/help lists them)")
            except SamoutError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        for piece in chat.send(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0
