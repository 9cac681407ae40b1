"""A LlamaIndex query engine on SemShare, asked several similar questions, fully offline.

Similar questions retrieve the same passages, so their prompts share most of their
text. Every query after the first borrows the KV cache of the most similar stored
prompt; the instrumentation events report by how much.

    python examples/llamaindex_query_engine.py           # six articles, five questions
    python examples/llamaindex_query_engine.py --short   # three cut articles, three questions, for CI
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent

from semshare_core.articles import article_pairs
from semshare_integrations.llamaindex import use_semshare

QUESTIONS = [
    "What does the article say about the Amazon rainforest?",
    "What does the article tell us about the Amazon rainforest?",
    "What is said about the Amazon rainforest in the article?",
    "Which countries are named in the article about the Amazon?",
    "Why are the countries arguing about the Amazon name?",
]


class ReuseRecorder(BaseEventHandler):
    """Keeps the ``raw`` part (usage and reuse details) of every finished chat call."""

    raws: list = []

    @classmethod
    def class_name(cls) -> str:
        return "ReuseRecorder"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None:
            self.raws.append(event.response.raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="three articles cut to 250 words, three questions")
    args = parser.parse_args()
    articles, words, questions, max_tokens = (3, 250, 3, 16) if args.short else (6, None, 5, 64)

    recorder = ReuseRecorder()
    get_dispatcher().add_event_handler(recorder)
    use_semshare(max_tokens=max_tokens, namespace="query-engine-example")
    documents = [
        Document(text=" ".join(pair.advanced.split()[:words]) if words else pair.advanced, metadata={"title": pair.name})
        for pair in article_pairs()[:articles]
    ]
    query_engine = VectorStoreIndex.from_documents(documents).as_query_engine(similarity_top_k=1)

    for question in QUESTIONS[:questions]:
        answer = query_engine.query(question)
        raw = recorder.raws[-1]
        usage, reuse = raw["usage"], raw["reuse"]
        print(f"Q: {question}\nA: {str(answer).strip()}")
        line = (
            f"   prompt {usage['prompt_tokens']} tok, borrowed {usage['prompt_tokens_details']['cached_tokens']},"
            f" TTFT {reuse['ttft_s'] * 1000:.1f} ms"
        )
        if reuse["reference_id"] is None:
            print(line + f", full prefill: {reuse['fallback_reason']}\n")
        else:
            print(line + f", similarity {reuse['similarity']:.2f}, recomputed {reuse['recomputed_share']:.0%}\n")


if __name__ == "__main__":
    main()
