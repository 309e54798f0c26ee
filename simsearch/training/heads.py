"""Projection heads and metric-learning losses (TensorFlow ops; imported only when training).

- head: dropout -> dense -> L2 normalisation, on L2-normalised backbone features, initialised as the PCA of the
  training features (centred), so the untrained head already keeps what the backbone knows;
- `proxy` loss: normalised softmax over one learnt proxy per label (cosine logits / temperature);
- `ms` loss: multi-similarity with hard-pair mining, on batches of P labels x K images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models._keras import keras, tensorflow

LOSSES = ("proxy", "ms")


def pca_init(features: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel (d, dim), bias (dim,)) projecting centred features on their top `dim` principal directions."""
    x = np.asarray(features, np.float64)
    if dim > min(x.shape):
        return None
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    kernel = vt[:dim].T.astype(np.float32)
    return kernel, (-mean @ kernel).astype(np.float32)


def build_head(
    in_dim: int, dim: int, dropout: float, seed: int, init: tuple[np.ndarray, np.ndarray] | None = None
) -> Any:
    """The trainable projection: (n, in_dim) unit features -> (n, dim) unit embeddings."""
    k = keras()
    inp = k.Input((in_dim,), name="features")
    x = k.layers.Dropout(dropout, seed=seed, name="head_dropout")(inp)
    dense = k.layers.Dense(dim, kernel_initializer=k.initializers.Orthogonal(seed=seed), name="head_dense")
    out = k.layers.UnitNormalization(name="embedding")(dense(x))
    model = k.Model(inp, out, name="simsearch_head")
    if init is not None:
        dense.set_weights([init[0], init[1]])
    return model


class ProxyLoss:
    """Normalised softmax: one unit proxy per label, logits = cosine / temperature."""

    def __init__(self, n_labels: int, dim: int, temperature: float = 0.05, seed: int = 0) -> None:
        tf = tensorflow()
        init = np.random.default_rng(seed).standard_normal((n_labels, dim)).astype(np.float32)
        self.proxies = tf.Variable(init / np.linalg.norm(init, axis=1, keepdims=True), name="proxies")
        self.temperature = temperature
        self.variables = [self.proxies]

    def __call__(self, emb: Any, labels: Any) -> Any:
        tf = tensorflow()
        p = tf.math.l2_normalize(self.proxies, axis=1)
        logits = tf.matmul(emb, p, transpose_b=True) / self.temperature
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


class MultiSimilarityLoss:
    """Multi-similarity loss (alpha 2, beta 50, lambda 0.5, mining margin 0.1)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, margin: float = 0.1) -> None:
        self.alpha, self.beta, self.base, self.margin = alpha, beta, base, margin
        self.variables: list[Any] = []

    def __call__(self, emb: Any, labels: Any) -> Any:
        tf = tensorflow()
        s = tf.matmul(emb, emb, transpose_b=True)
        same = tf.equal(labels[:, None], labels[None, :])
        eye = tf.eye(tf.shape(emb)[0], dtype=tf.bool)
        pos = tf.logical_and(same, tf.logical_not(eye))
        neg = tf.logical_not(same)
        big = tf.constant(1e4, s.dtype)
        min_pos = tf.reduce_min(tf.where(pos, s, big), axis=1, keepdims=True)
        max_neg = tf.reduce_max(tf.where(neg, s, -big), axis=1, keepdims=True)
        pos_m = tf.logical_and(pos, s - self.margin < max_neg)
        neg_m = tf.logical_and(neg, s + self.margin > min_pos)
        zero = tf.zeros_like(s)
        pos_term = tf.math.log1p(tf.reduce_sum(tf.where(pos_m, tf.exp(-self.alpha * (s - self.base)), zero), 1))
        neg_term = tf.math.log1p(tf.reduce_sum(tf.where(neg_m, tf.exp(self.beta * (s - self.base)), zero), 1))
        return tf.reduce_mean(pos_term / self.alpha + neg_term / self.beta)


def make_loss(name: str, n_labels: int, dim: int, seed: int, temperature: float = 0.05) -> Any:
    if name == "proxy":
        return ProxyLoss(n_labels, dim, temperature, seed)
    if name == "ms":
        return MultiSimilarityLoss()
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def batches(labels: np.ndarray, batch_size: int, loss: str, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of index batches: shuffled for `proxy`; P labels x K=4 images each for `ms`."""
    n = len(labels)
    if loss != "ms":
        order = rng.permutation(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    k = 4
    by_label = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    groups = []
    for idx in by_label:
        if len(idx) < 2:
            continue
        reps = max(1, len(idx) // k)
        pad = np.resize(idx, reps * k)  # labels with fewer than K images repeat some
        groups += [pad[i * k : (i + 1) * k] for i in range(reps)]
    order = rng.permutation(len(groups))
    per = max(2, batch_size // k)
    return [np.concatenate([groups[g] for g in order[i : i + per]]) for i in range(0, len(order), per)]
