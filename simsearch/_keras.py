"""Quiet, lazy access to Keras/TensorFlow: importing them costs seconds, so only embedding paths call this."""

from __future__ import annotations

import os
from functools import cache
from typing import Any


@cache
def keras() -> Any:
    """Import Keras on the TensorFlow backend with TensorFlow's start-up log lines silenced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    import keras as _keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    _keras.utils.disable_interactive_logging()
    return _keras


def tensorflow() -> Any:
    keras()
    import tensorflow as tf

    return tf
