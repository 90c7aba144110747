"""The retrieval service (``mrl serve``): FastAPI over an index loaded at start-up.

``service`` imports ``index`` and ``training``, never the other way round. The HTTP layer
(``app``) holds no model or FAISS code: it calls :class:`service.engine.Searcher`.
"""
