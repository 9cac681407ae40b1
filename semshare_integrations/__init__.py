"""LangChain and LlamaIndex adapters of SemShare.

Import the adapter of your framework from its module, so that only that framework
needs to be installed:

- ``semshare_integrations.langchain``: ``ChatSemShare`` and ``SemShareLLM``
  (``pip install semshare[langchain]``).
- ``semshare_integrations.llamaindex``: ``SemShare``, ``SemShareEmbedding`` and
  ``use_semshare`` (``pip install semshare[llamaindex]``).
"""
