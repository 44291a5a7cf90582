"""Chat models: the chat template, conversations kept as a state, and the demo tasks.

    from samout.chat import Conversation
    chat = Conversation.load_run("runs/sft")
    for piece in chat.send("What is the largest: 3 9 4?"):
        print(piece, end="")
"""

from __future__ import annotations

from samout.chat.conversation import Conversation
from samout.chat.template import DEFAULT_CHAT_TEMPLATE, assistant_mask, load_chat_template, render_ids

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Conversation", "assistant_mask", "load_chat_template", "render_ids"]
