"""Models: the backbone registry, EfficientNet-Lite with offline weights, TFLite execution and the embedder.

Files flow in as decoded pixels (`simsearch.images`) and leave as L2-normalised float32 vectors.
"""
