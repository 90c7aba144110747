"""Peer search servers for ``mrl bench peers``: what a user would run instead of this project.

Each is a real module started as ``python -m benchmarks.peer_servers.<name>`` in its own process,
so that it is measured over HTTP exactly like ``mrl serve``. They import nothing from this project.
"""
