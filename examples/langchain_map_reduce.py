"""Map-reduce summary of related news articles with LangChain on SemShare.

Each story comes as two rewrites (advanced and intermediate reading level). The map
step summarizes every article, and the rewrite of a story borrows the KV cache of
the version summarized before it. The reduce step summarizes the summaries.

    python examples/langchain_map_reduce.py            # four stories, full articles
    python examples/langchain_map_reduce.py --short    # two stories, cut, for CI
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate

from semshare_core.articles import article_pairs
from semshare_integrations.langchain import ChatSemShare

MAP_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You summarize news articles in two sentences."),
        ("human", "Summarize this article.\n\n{article}"),
    ]
)
REDUCE_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You combine article summaries into one short news digest."),
        ("human", "Write a digest of these summaries.\n\n{summaries}"),
    ]
)


def reuse_line(label: str, message: AIMessage) -> str:
    """Format what reuse did for one call: borrowed tokens, similarity, recomputed share, TTFT."""
    usage = message.usage_metadata
    meta = message.response_metadata
    line = (
        f"{label:<34} prompt {usage['input_tokens']:>5} tok  borrowed {usage['input_token_details']['cache_read']:>5}"
        f"  TTFT {meta['ttft_s'] * 1000:7.1f} ms"
    )
    if meta["reference_id"] is None:
        return line + f"  full prefill: {meta['fallback_reason']}"
    return line + f"  similarity {meta['similarity']:.2f}  recomputed {meta['recomputed_share']:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="two stories cut to 300 words and 16-token summaries")
    args = parser.parse_args()
    stories, words, max_tokens = (2, 300, 16) if args.short else (4, None, 96)

    llm = ChatSemShare(max_tokens=max_tokens, namespace="map-reduce-example")
    map_chain = MAP_PROMPT | llm
    summaries = []
    borrowed = total = 0
    for pair in article_pairs()[:stories]:
        for level, text in (("advanced", pair.advanced), ("intermediate", pair.intermediate)):
            article = " ".join(text.split()[:words]) if words else text
            message = map_chain.invoke({"article": article})
            summaries.append(f"- {pair.name} ({level}): {message.content.strip()}")
            borrowed += message.usage_metadata["input_token_details"]["cache_read"]
            total += message.usage_metadata["input_tokens"]
            print(reuse_line(f"map {pair.name} ({level})", message))

    digest = (REDUCE_PROMPT | llm).invoke({"summaries": "\n".join(summaries)})
    print(reuse_line("reduce", digest))
    print(f"\nmap step: {borrowed} of {total} prompt tokens served from borrowed caches")
    print("\nSummaries:\n" + "\n".join(summaries))
    print("\nDigest:\n" + digest.content.strip())


if __name__ == "__main__":
    main()
