"""Index building: encode a corpus once, one FAISS index per Matryoshka dimension, a manifest."""
