"""Projection heads and metric-learning losses (TensorFlow ops; imported only when training).

- head: dropout -> dense -> L2 normalisation, on L2-normalised backbone features, initialised as the PCA of the
  training features (centred), so the untrained head already keeps what the backbone knows;
- `proxy` loss: normalised softmax over one learnt proxy per label (cosine logits / temperature);
- `ms` loss: multi-similarity with hard-pair mining, on batches of P labels x K images;
- `proxy-anchor` loss: Proxy-Anchor (Kim et al. 2020): each proxy pulls its batch's positives and pushes its
  negatives with a soft-max weighting, so hard examples weigh most; proxies learn 100x faster than the head.

Proxies start at the class means of the untrained head's embeddings (a fair start that makes short runs work).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models._keras import keras, tensorflow

LOSSES = ("proxy", "ms", "proxy-anchor")


def pca_init(features: np.ndarray, dim: int, whiten: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel (d, dim), bias (dim,)) projecting centred features on their top `dim` principal directions.

    `whiten` in [0, 1]: each direction is divided by its standard deviation to that power (1: PCA whitening, the
    classic learnt whitening of instance retrieval; 0.5: a shrunk one), so rare directions count as much as common
    ones once the embedding is L2-normalised.
    """
    x = np.asarray(features, np.float64)
    if dim > min(x.shape):
        return None
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    kernel = vt[:dim].T
    if whiten > 0:
        std = sv[:dim] / np.sqrt(max(1, len(x) - 1))
        kernel = kernel / np.power(np.maximum(std, 1e-6 * std[0]), whiten) * np.power(std[0], whiten)
    kernel = kernel.astype(np.float32)
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

    lr_mult = 1.0

    def __init__(self, n_labels: int, dim: int, temperature: float = 0.05, seed: int = 0,
                 init: np.ndarray | None = None) -> None:  # fmt: skip
        tf = tensorflow()
        if init is None:
            init = np.random.default_rng(seed).standard_normal((n_labels, dim))
        init = np.asarray(init, np.float32)
        self.proxies = tf.Variable(init / np.maximum(np.linalg.norm(init, axis=1, keepdims=True), 1e-12),
                                   name="proxies")  # fmt: skip
        self.temperature = temperature
        self.variables = [self.proxies]

    def __call__(self, emb: Any, labels: Any) -> Any:
        tf = tensorflow()
        p = tf.math.l2_normalize(self.proxies, axis=1)
        logits = tf.matmul(emb, p, transpose_b=True) / self.temperature
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor (alpha 32, margin 0.1): log(1 + sum exp(-a(s - m))) over each batch class's positives, averaged
    over the proxies present in the batch, plus log(1 + sum exp(a(s + m))) over every proxy's negatives."""

    lr_mult = 100.0

    def __init__(self, n_labels: int, dim: int, seed: int = 0, init: np.ndarray | None = None,
                 alpha: float = 32.0, margin: float = 0.1) -> None:  # fmt: skip
        super().__init__(n_labels, dim, 1.0, seed, init)
        self.alpha, self.margin, self.n_labels = alpha, margin, n_labels

    def __call__(self, emb: Any, labels: Any) -> Any:
        tf = tensorflow()
        cos = tf.matmul(emb, tf.math.l2_normalize(self.proxies, axis=1), transpose_b=True)
        pos = tf.one_hot(labels, self.n_labels, dtype=cos.dtype)
        neg = 1.0 - pos
        pos_sum = tf.reduce_sum(pos * tf.exp(-self.alpha * (cos - self.margin)), axis=0)
        neg_sum = tf.reduce_sum(neg * tf.exp(self.alpha * (cos + self.margin)), axis=0)
        present = tf.maximum(tf.reduce_sum(tf.cast(tf.reduce_sum(pos, axis=0) > 0, cos.dtype)), 1.0)
        return tf.reduce_sum(tf.math.log1p(pos_sum)) / present + tf.reduce_mean(tf.math.log1p(neg_sum))


class MultiSimilarityLoss:
    """Multi-similarity loss (alpha 2, beta 50, lambda 0.5, mining margin 0.1)."""

    lr_mult = 1.0

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


def class_means(emb: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, d) mean embedding of each label (dense ids 0..n_labels-1): where proxies start."""
    out = np.zeros((n_labels, emb.shape[1]), np.float64)
    np.add.at(out, labels, emb)
    return out.astype(np.float32)


def make_loss(name: str, n_labels: int, dim: int, seed: int, temperature: float = 0.05,
              init: np.ndarray | None = None) -> Any:  # fmt: skip
    """The loss object (callable on (embeddings, dense labels); `variables` are its trainable proxies)."""
    if name == "proxy":
        return ProxyLoss(n_labels, dim, temperature, seed, init)
    if name == "proxy-anchor":
        return ProxyAnchorLoss(n_labels, dim, seed, init)
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
