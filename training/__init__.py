"""Matryoshka fine-tuning and per-dimension evaluation (the first stage of the data path); imports ``core`` only."""
