"""Transfer learning: adapt a backbone to a user's labelled images, and measure any embedding on them.

labels (labelled folders, splits) -> features (frozen backbone, cached) -> heads (projection, losses) ->
trainer (head or fine-tuning, early stopping) -> a MODEL_DIR usable as a backbone everywhere; evaluate (metrics).
"""
