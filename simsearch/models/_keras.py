"""Quiet, lazy access to Keras/TensorFlow: importing them costs seconds, so only embedding paths call this."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++ log lines written straight to fd 2 (TensorFlow's oneDNN/absl banners) for the block.

    Python exceptions still propagate; set SIMSEARCH_DEBUG=1 to see the native output.
    """
    if os.environ.get("SIMSEARCH_DEBUG"):
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@cache
def keras() -> Any:
    """Import Keras on the TensorFlow backend with TensorFlow's start-up log lines silenced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with quiet_native_stderr():
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
