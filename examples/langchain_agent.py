"""A LangChain conversational agent on SemShare with a tool and a trimmed history.

The agent reads articles with a tool and answers follow-up questions. Before each
model call the history is trimmed to a token budget, so the oldest turns drop out
and the prompt no longer starts like the stored one: reuse then comes from
semantic matching, not from an exact prefix. Each model call prints what it borrowed.
The default 135M model writes tool calls poorly (it often cuts them off or echoes the
<tool_response> format in answers); the agent repairs cut-off calls and says so.

    python examples/langchain_agent.py            # full articles, longer answers
    python examples/langchain_agent.py --short    # articles cut to 200 words, for CI
"""

from __future__ import annotations

import argparse
import difflib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, trim_messages
from langchain_core.tools import tool
from langchain_core.utils.json import parse_partial_json

from semshare_core.articles import article_pairs
from semshare_integrations.langchain import ChatSemShare

ARTICLES = {pair.name: pair for pair in article_pairs()}
WORD_LIMIT: int | None = None

# (question, tool_choice): a tool name forces a call of that tool, None lets the model decide.
TURNS = [
    ("Read the article about banksy and tell me who Banksy is.", "read_article"),
    ("Where did the new artwork appear?", None),
    ("Now read the simple version of the banksy article and tell me again who Banksy is.", "read_simple_article"),
    ("What did people think of the artwork?", None),
]


def _article(title: str, advanced: bool) -> str:
    matches = difflib.get_close_matches(title.lower(), ARTICLES, n=1, cutoff=0.3)
    if not matches:
        return f"No article is titled {title!r}; the titles are: {', '.join(ARTICLES)}"
    pair = ARTICLES[matches[0]]
    text = pair.advanced if advanced else pair.intermediate
    return " ".join(text.split()[:WORD_LIMIT]) if WORD_LIMIT else text


@tool
def read_article(title: str) -> str:
    """Return the text of the news article with this title."""
    return _article(title, advanced=True)


@tool
def read_simple_article(title: str) -> str:
    """Return the text of the news article with this title, rewritten in simpler English."""
    return _article(title, advanced=False)


TOOLS = {tool.name: tool for tool in (read_article, read_simple_article)}


def repaired_calls(message: AIMessage) -> list[dict]:
    """Recover calls whose JSON was cut off: a 135M model often adds keys after "title"."""
    calls = []
    for invalid in message.invalid_tool_calls:
        payload = parse_partial_json(invalid["args"] or "{}")
        arguments = payload.get("arguments") if isinstance(payload, dict) else None
        if invalid["name"] in TOOLS and isinstance(arguments, dict) and isinstance(arguments.get("title"), str):
            print(f"  repaired a cut-off call of {invalid['name']}: {invalid['error']}")
            calls.append({"name": invalid["name"], "args": {"title": arguments["title"]}, "id": invalid["id"], "type": "tool_call"})
        else:
            print(f"  dropped an invalid call: {invalid['error']}")
    return calls


def reuse_line(label: str, message: AIMessage) -> str:
    """Format what reuse did for one call: borrowed tokens, exact prefix, similarity, TTFT."""
    usage = message.usage_metadata
    meta = message.response_metadata
    line = (
        f"  [{label}] prompt {usage['input_tokens']} tok, borrowed {usage['input_token_details']['cache_read']}"
        f" (exact prefix {meta['prefix_tokens']}), TTFT {meta['ttft_s'] * 1000:.1f} ms"
    )
    if meta["reference_id"] is None:
        return line + f", full prefill: {meta['fallback_reason']}"
    return line + f", similarity {meta['similarity']:.2f}, recomputed {meta['recomputed_share']:.0%}"


def run_turn(llm: ChatSemShare, history: list[BaseMessage], tool_choice: str | None, budget: int) -> None:
    """Answer the last human message: call a tool when the model asks for one, then answer.

    The history is trimmed to ``budget`` tokens before every call, and a repaired
    tool call replaces the broken one in the history.
    """
    for step in ("call", "answer"):
        trimmed = trim_messages(
            history, max_tokens=budget, token_counter=llm, strategy="last", include_system=True, start_on="human"
        )
        choice = tool_choice if step == "call" else None
        message = llm.bind_tools(list(TOOLS.values()), tool_choice=choice).invoke(trimmed)
        print(reuse_line(f"{step}, {len(trimmed)} of {len(history)} messages", message))
        calls = message.tool_calls or repaired_calls(message)
        if not calls:
            history.append(message)
            print(f"  answer: {message.content.strip()}")
            return
        history.append(AIMessage(content=message.content, tool_calls=calls))
        for call in calls:
            print(f"  tool call: {call['name']}({call['args']})")
            history.append(TOOLS[call["name"]].invoke(call))
    print("  the model called a tool again instead of answering")


def main() -> None:
    global WORD_LIMIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="articles cut to 200 words and 24-token answers")
    args = parser.parse_args()
    WORD_LIMIT, max_tokens, budget = (200, 24, 600) if args.short else (None, 80, 2500)

    llm = ChatSemShare(max_tokens=max_tokens, namespace="agent-example", min_prompt_tokens=128)
    history: list[BaseMessage] = [SystemMessage("You answer questions about news articles. Be brief.")]
    for question, tool_choice in TURNS:
        print(f"User: {question}")
        history.append(HumanMessage(question))
        run_turn(llm, history, tool_choice, budget)


if __name__ == "__main__":
    main()
