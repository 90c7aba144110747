"""The retrieval service (``mrl serve``): FastAPI over an index loaded at start-up.

``service`` imports ``core`` and ``index``, never ``training`` or ``benchmarks``. The HTTP
layer (``app``, ``routes``) holds no model or FAISS code: it calls
:class:`service.engine.Searcher`.
"""
