"""Index building and loading: encode a corpus once, one index per Matryoshka dimension, a manifest.

Indexes are reached through the backend contract of ``index.backends``; ``index`` imports
``core`` only.
"""
