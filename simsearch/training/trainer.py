"""Train a projection head (optionally fine-tuning the backbone's last block) on a labelled folder.

`head`: the backbone is frozen and its features are computed once (fast TFLite path, cached on disk); only the
projection and the label proxies learn. `finetune`: the head is trained first exactly as in `head`, then the
backbone's upper part (see `finetune.split_backbone`) learns with it at a 10x lower rate, BatchNorm frozen, on
cached activations of augmented views. Both stop early on the held-out validation mAP and keep the best epoch:
fine-tuning is kept only where it beats the head on held-out images.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..models.backbones import DEFAULT_BACKBONE, DEFAULT_POOLING, resolve_backbone
from ..models.embedder import DEFAULT_FIT
from ..models.tta import DEFAULT_TTA, average_views, views_of
from .labels import LabelledSet, Split, load_labelled, split
from .metrics import retrieval_metrics

MODES = ("head", "finetune")
TrainProgress = Callable[[str, int, int, dict], None]

DEFAULTS = {
    "head": {"epochs": 60, "patience": 10, "batch_size": 128, "lr": 3e-3},
    "finetune": {"epochs": 10, "patience": 3, "batch_size": 64, "lr": 1e-3, "backbone_lr": 1e-4},
}


@dataclass
class TrainResult:
    """What training made and how it went: the MODEL_DIR, its manifest, the per-epoch history."""

    model_dir: str
    manifest: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "mode": self.manifest["training"]["mode"],
                "metrics": self.manifest["metrics"], "split": self.manifest["training"]["split"],
                "epochs": len(self.history), "best_epoch": self.manifest["training"]["best_epoch"],
                "seconds": round(self.seconds, 2), "interrupted": self.interrupted, "warnings": self.warnings,
                "skipped": self.skipped, "timings": self.timings, "chosen": self.chosen,
                "refit": self.manifest["training"].get("refit"), "history": self.history}  # fmt: skip


class _Stop(Exception):
    pass


def train(
    folder: str | Path,
    out: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    mode: str = "head",
    dim: int = 256,
    epochs: int | None = None,
    val_split: float = 0.2,
    split_by: str = "labels",
    seed: int = 0,
    labels: str | Path | None = None,
    loss: str = "ms",
    overwrite: bool = False,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int | None = None,
    dropout: float = 0.1,
    weight_decay: float = 1e-4,
    views: int = 4,
    fit: str = DEFAULT_FIT,
    pooling: str = DEFAULT_POOLING,
    input_size: int | None = None,
    progress: TrainProgress | None = None,
    refit: bool = True,
    whiten: float = 1.0,
    augment: str = "light",
    unfreeze: float | str = "auto",
    head_views: int = 0,
    tta: str = DEFAULT_TTA,
) -> TrainResult:
    """Adapt `backbone` to the labelled images of `folder` and write a MODEL_DIR to `out` (see module docs).

    Labels are the first-level subfolders, or `labels` (a path,label CSV). `split_by="labels"` holds out whole
    labels for validation, `"images"` a share of every label's images. Ctrl-C stops training and keeps the best
    epoch so far (`interrupted` in the result).

    Model selection (the epoch count of each phase, whether fine-tuning beats the head) is made on the held-out
    labels; then, with `refit` (default), the chosen settings are trained again on every label, held-out ones too,
    for exactly the chosen epochs, so no labelled image is wasted. The reported held-out metrics are those of the
    selection run (the refit model has seen those images). `whiten`: see `heads.pca_init`.

    `unfreeze`: the least share of the backbone's weights `finetune` trains; several shares ("0.25,0.5") or
    "auto" (`AUTO_UNFREEZE`) try each cut from the same trained head and keep the one with the best held-out mAP.

    `tta` (`models.tta`): the test-time views the exported model averages ("none", "flip", "flip-crop"); the
    held-out figures that select epochs and that are reported average the same views, computed the same way.
    """
    from .heads import LOSSES

    t0 = time.perf_counter()
    if mode not in MODES:
        raise BadInputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if loss not in LOSSES:
        raise BadInputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if dim < 2:
        raise BadInputError("--dim must be at least 2")
    from .finetune import AUGMENTS

    if augment not in AUGMENTS:
        raise BadInputError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if head_views < 0:
        raise BadInputError("--head-views must be 0 or more")
    shares = unfreeze_shares(unfreeze)
    if not 0.0 <= whiten <= 1.0:
        raise BadInputError(f"--whiten must be in [0, 1], got {whiten}")
    if epochs is not None and epochs < 1:
        raise BadInputError("--epochs must be at least 1")
    tta_views = views_of(tta)
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise BadInputError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    cfg = {**DEFAULTS[mode]}
    cfg.update({k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                   "patience": patience}.items() if v is not None})  # fmt: skip
    data = load_labelled(folder, labels)
    warnings = list(data.warnings)
    sp = split(data, split_by, val_split, seed)
    spec = resolve_backbone(backbone, weights, pooling, input_size, seed)
    if spec.family == "trained":
        raise BadInputError("train from a registry backbone or a .keras file, not from a trained MODEL_DIR")

    from ..models.embedder import Embedder
    from .features import extract_features

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock[0], 2)
        clock[0] = now

    emb = Embedder(spec, fit=fit, seed=seed)
    spec = emb.backbone.spec  # a .keras file's input size is known once it is built
    note = progress or (lambda *a: None)
    feats, ok, errors = extract_features(emb, data.paths, lambda ph, d, t: note(ph, d, t, {}))
    lap("features")
    skipped = [{"path": p, "error": e} for p, e in errors]
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable file(s)")
    tr, va = _readable(sp, ok, data)
    lab_all = data.label_ids()
    row = {int(i): r for r, i in enumerate(ok)}  # data index -> feature row
    y_tr, y_va = lab_all[tr], lab_all[va]
    f_tr, f_va = feats[[row[i] for i in tr]], feats[[row[i] for i in va]]
    x_tr = x_va = None
    if head_views > 0 and mode == "head":
        from .features import augmented_features

        xv = augmented_features(emb, [data.paths[i] for i in ok], head_views, augment, seed,
                                lambda ph, d, t: note("views", d, t, {}))  # fmt: skip
        x_tr, x_va = xv[[row[i] for i in tr]], xv[[row[i] for i in va]]
        lap("views")
    # the exported model's test-time views of the held-out images (view 0: the plain features above)
    v_va = f_va[:, None]
    if len(tta_views) > 1:
        from .features import tta_features

        extra = tta_features(emb, [data.paths[i] for i in va], tta_views[1:], lambda ph, d, t: note("tta", d, t, {}))
        v_va = np.concatenate([v_va, extra], axis=1)
        lap("tta")
    before = retrieval_metrics(f_va, y_va, target_precision=None)  # the base backbone as `eval` scores it

    from ..models._keras import keras

    k = keras()
    k.utils.set_random_seed(seed)
    _, y_tr_dense = np.unique(y_tr, return_inverse=True)
    head_cfg = cfg if mode == "head" else DEFAULTS["head"]
    fitter = _HeadFit(f_tr, y_tr_dense, dim, dropout, seed, loss, head_cfg["lr"], weight_decay, whiten, x_tr)
    head = fitter.head

    def embed_va(fit_: _HeadFit) -> np.ndarray:
        """The held-out embeddings the exported model would give: its TTA views averaged."""
        return average_views([fit_.embed(v_va[:, j]) for j in range(v_va.shape[1])])

    init = retrieval_metrics(embed_va(fitter), y_va, target_precision=None)
    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    state = _Loop(history, note, warnings)

    # ---- model selection, phase 1: the head on frozen features -------------------------------------------------
    sample = rng.permutation(len(tr))[:1500]

    def head_eval() -> tuple[float, float, float]:
        m = retrieval_metrics(embed_va(fitter), y_va, target_precision=None)
        return retrieval_metrics(fitter.embed(f_tr[sample]), y_tr[sample], target_precision=None).map, m.map, m.p_at_1

    state.run("head", head_cfg["epochs"], head_cfg["patience"], lambda: fitter.epoch(head_cfg["batch_size"], rng),
              head_eval, fitter.get, fitter.put)  # fmt: skip
    lap("head")
    bb = spec.build()
    cut, ft_metrics, share = None, None, shares[0]
    tried: list[dict[str, Any]] = []
    if mode == "finetune" and not state.interrupted:

        def tune(b: Any, run: _Loop, share_n: float, phase: str) -> tuple[str, Any]:
            return _finetune(b, spec, data, tr, va, y_tr_dense, y_va, fitter, cfg, views, fit, seed, loss,
                             weight_decay, rng, run, note, augment=augment, unfreeze=share_n, tta_views=tta_views,
                             phase=phase)  # fmt: skip

        cut, bb, ft_metrics, share, tried = _choose_cut(bb, spec, shares, fitter, state, tune)
        lap("finetune")
    timings["select"] = round(timings.get("head", 0.0) + timings.get("finetune", 0.0), 2)
    best = state.best_entry()
    best_phase = str(best.get("phase", ""))
    tag = "finetune" if best_phase.startswith("finetune") else "head"
    head_epochs = _best_count(history, "head")
    ft_epochs = _best_count(history, best_phase) if tag == "finetune" else 0
    # held-out metrics of the selected model (head: on the cached features, which is what the model computes)
    final_va = ft_metrics if tag == "finetune" else retrieval_metrics(embed_va(fitter), y_va)

    # ---- refit: the chosen settings again, on every label (held-out ones too) ---------------------------------
    refit_info: dict[str, Any] = {"done": False}
    if refit and head_epochs > 0 and not state.interrupted:
        everything = np.concatenate([tr, va])
        _, y_all = np.unique(lab_all[everything], return_inverse=True)
        f_all = np.concatenate([f_tr, f_va])
        k.utils.set_random_seed(seed)
        x_all = None if x_tr is None else np.concatenate([x_tr, x_va])
        refitter = _HeadFit(f_all, y_all, dim, dropout, seed, loss, head_cfg["lr"], weight_decay, whiten, x_all)
        r_rng = np.random.default_rng(seed + 1)
        r_state = _Loop(history, note, warnings, select=False)
        r_state.run("refit-head", head_epochs, head_epochs, lambda: refitter.epoch(head_cfg["batch_size"], r_rng),
                    None, refitter.get, refitter.put)  # fmt: skip
        r_bb = bb
        if tag == "finetune" and not r_state.interrupted:
            r_bb = spec.build()
            _finetune(r_bb, spec, data, everything, va, y_all, y_va, refitter, {**cfg, "epochs": ft_epochs}, views,
                      fit, seed, loss, weight_decay, r_rng, r_state, note, select=False, augment=augment,
                      unfreeze=share)  # fmt: skip
        if r_state.interrupted:
            warnings.append("refit interrupted: the model selected on held-out labels is saved instead")
            state.interrupted = True
        else:
            head, bb = refitter.head, r_bb
            refit_info = {"done": True, "images": int(len(everything)), "labels": int(y_all.max()) + 1,
                          "head_epochs": head_epochs, "finetune_epochs": ft_epochs or None}  # fmt: skip
        lap("refit")
    chosen = {"mode": tag, "loss": loss, "head_epochs": head_epochs, "finetune_epochs": ft_epochs or None,
              "cut": cut if tag == "finetune" else None, "unfreeze": share if tag == "finetune" else None,
              "cuts_tried": tried or None, "whiten": whiten,
              "augment": augment if tag == "finetune" or head_views else None, "head_views": head_views,
              "refit": bool(refit_info["done"]), "tta": tta}  # fmt: skip

    # ---- export --------------------------------------------------------------------------------------------------
    from ..models.tta import with_tta

    inp = k.Input((spec.input_size, spec.input_size, 3), name="image")
    core_name = "simsearch_trained" if tta == "none" else "simsearch_embed"
    model = k.Model(inp, head(k.layers.UnitNormalization(name="features_norm")(bb.model(inp))), name=core_name)
    model = with_tta(model, tta, spec.input_size)
    manifest = {
        "simsearch_version": _version(),
        "base": {**spec.signature(bb.dim), "fit": fit, "seed": seed},
        "preprocess": spec.preprocess,
        "input_size": spec.input_size,
        "fit": fit,
        "dim": dim,
        "pooling": f"{spec.pooling}+head",
        "tta": tta,
        "tta_views": list(tta_views),
        "training": {
            "mode": mode, "loss": loss, "files": len(tr) + len(va), "labels": len(set(data.labels)),
            "files_digest": data.digest(), "split": sp.to_json(data), "best_epoch": best.get("epoch"),
            "best_phase": tag, "epochs_run": len(history), "cut": cut, "views": views if mode == "finetune" else None,
            "augment": augment if mode == "finetune" or head_views else None, "head_views": head_views,
            "params": {**cfg, "dim": dim, "dropout": dropout, "weight_decay": weight_decay, "whiten": whiten},
            "interrupted": state.interrupted, "refit": refit_info, "chosen": chosen,
        },
        "metrics": {"val_map_before": round(before.map, 6), "val_p_at_1_before": round(before.p_at_1, 6),
                    "val_map_untrained_head": round(init.map, 6),
                    "val_map": round(final_va.map, 6), "val_p_at_1": round(final_va.p_at_1, 6),
                    "val_recall_at": {str(kk): round(v, 6) for kk, v in final_va.recall_at.items()},
                    "val_threshold": final_va.threshold},
    }  # fmt: skip
    if final_va.map <= before.map:
        warnings.append(
            f"the trained model does not beat {spec.name} on the held-out images (mAP {final_va.map:.4f} vs "
            f"{before.map:.4f}): index with {spec.name} itself, or train on more labels"
        )
    written = _write(out, model, manifest, history, data, sp, va, overwrite)
    lap("export")
    return TrainResult(str(out), written, history, time.perf_counter() - t0, state.interrupted, warnings, skipped,
                       timings, chosen)  # fmt: skip


AUTO_UNFREEZE = (0.25, 0.5)  # EfficientNet-Lite0: the last block and head conv, or the last 4 blocks


def unfreeze_shares(value: float | str | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """The shares of weights to try fine-tuning: one number, a comma list (or a sequence), or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_UNFREEZE
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        shares = tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        raise BadInputError(f"--unfreeze takes a share in (0, 1), a list of them, or auto; got {value!r}") from None
    if not shares or not all(0.0 < x < 1.0 for x in shares):
        raise BadInputError(f"--unfreeze must be in (0, 1), got {value}")
    return tuple(dict.fromkeys(shares))


def _readable(sp: Split, ok: np.ndarray, data: LabelledSet) -> tuple[np.ndarray, np.ndarray]:
    okset = set(ok.tolist())
    tr = np.array([i for i in sp.train if i in okset], np.int64)
    va = np.array([i for i in sp.val if i in okset], np.int64)
    labels = np.array(data.labels)
    if len(set(labels[va])) < 2 or len(set(labels[tr])) < 2:
        raise BadInputError("too few readable images left to train and validate (need 2 labels in each part)")
    return tr, va


def _best_count(history: list[dict[str, Any]], phase: str) -> int:
    """How many epochs of `phase` ran up to its best one (0 when none was best): the epochs a refit runs."""
    ran = [h for h in history if h["phase"] == phase]
    best = [i for i, h in enumerate(ran, 1) if h.get("best")]
    return best[-1] if best else 0


class _HeadFit:
    """A projection head and its loss on (n, d) features with dense labels: one epoch, embed, snapshot, restore."""

    def __init__(self, f: np.ndarray, y: np.ndarray, dim: int, dropout: float, seed: int, loss: str, lr: float,
                 weight_decay: float, whiten: float, extra: np.ndarray | None = None) -> None:  # fmt: skip
        from ..models._keras import keras, tensorflow
        from .heads import build_head, class_means, make_loss, pca_init

        k, tf = keras(), tensorflow()
        self.f, self.y, self.loss, self.extra = f, y, loss, extra
        n_labels = int(y.max()) + 1
        self.head = build_head(f.shape[1], dim, dropout, seed, pca_init(f, dim, whiten))
        self.loss_fn = make_loss(loss, n_labels, dim, seed, init=class_means(self.embed(f), y, n_labels))
        self.vars = self.head.trainable_variables + self.loss_fn.variables
        opt = k.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)
        opt_p = k.optimizers.AdamW(learning_rate=lr * self.loss_fn.lr_mult, weight_decay=0.0)
        hv, pv = self.head.trainable_variables, self.loss_fn.variables

        @tf.function(reduce_retracing=True)
        def step(x: Any, yb: Any) -> Any:
            with tf.GradientTape() as tape:
                value = self.loss_fn(self.head(x, training=True), yb)
            grads = tape.gradient(value, hv + pv)
            opt.apply_gradients(zip(grads[: len(hv)], hv, strict=True))
            if pv:
                opt_p.apply_gradients(zip(grads[len(hv) :], pv, strict=True))
            return value

        self._step = step

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[float]:
        from .heads import batches

        out = []
        for b in batches(self.y, batch_size, self.loss, rng):
            x = self.f[b]
            if self.extra is not None:  # each image: its plain feature or one of its augmented views' (1 in V+1)
                v = rng.integers(0, self.extra.shape[1] + 1, size=len(b))
                aug = v > 0
                x = x.copy()
                x[aug] = self.extra[b[aug], v[aug] - 1]
            out.append(float(self._step(x, self.y[b])))
        return out

    def embed(self, f: np.ndarray) -> np.ndarray:
        return np.asarray(self.head(f, training=False))

    def get(self) -> list[np.ndarray]:
        return [v.numpy().copy() for v in self.vars]

    def put(self, state: list[np.ndarray]) -> None:
        for v, x in zip(self.vars, state, strict=True):
            v.assign(x)


OVERFIT_WARNING = "validation mAP fell for 2 epochs while training mAP rose"


class _Loop:
    """Epochs with early stopping on validation mAP, best-state restore, history, overfitting warning, Ctrl-C.

    `select=False` (a refit): no held-out figure, every epoch runs, the last state is kept.
    """

    def __init__(self, history: list[dict[str, Any]], note: TrainProgress, warnings: list[str],
                 select: bool = True) -> None:  # fmt: skip
        self.history, self.note, self.warnings, self.select = history, note, warnings, select
        self.interrupted = False
        self.best_map = -1.0

    def best_entry(self) -> dict[str, Any]:
        good = [h for h in self.history if h.get("best")]
        return good[-1] if good else {}

    def run(self, phase: str, epochs: int, patience: int, epoch_fn: Callable[[], list[float]],
            eval_fn: Callable[[], tuple[float, float, float]] | None, get: Callable[[], Any],
            put: Callable[[Any], Any]) -> None:  # fmt: skip
        best_state, stale = get(), 0
        t_start = time.perf_counter()
        try:
            for e in range(1, epochs + 1):
                t = time.perf_counter()
                losses = epoch_fn()
                if eval_fn is None or not self.select:
                    entry = {"epoch": len(self.history) + 1, "phase": phase, "loss": round(float(np.mean(losses)), 6),
                             "train_map": None, "val_map": None, "val_p_at_1": None,
                             "seconds": round(time.perf_counter() - t, 3), "best": False}  # fmt: skip
                    self.history.append(entry)
                    per = (time.perf_counter() - t_start) / e
                    self.note("epoch", e, epochs, {**entry, "eta": per * (epochs - e)})
                    continue
                tr_map, va_map, va_p1 = eval_fn()
                improved = va_map > self.best_map + 1e-5
                entry = {"epoch": len(self.history) + 1, "phase": phase, "loss": round(float(np.mean(losses)), 6),
                         "train_map": round(tr_map, 6), "val_map": round(va_map, 6), "val_p_at_1": round(va_p1, 6),
                         "seconds": round(time.perf_counter() - t, 3), "best": improved}  # fmt: skip
                self.history.append(entry)
                if improved:
                    self.best_map, best_state, stale = va_map, get(), 0
                else:
                    stale += 1
                self._check_overfit()
                per = (time.perf_counter() - t_start) / e
                self.note("epoch", e, epochs, {**entry, "phase": phase, "eta": per * (epochs - e)})
                if stale >= patience:
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        if self.select:
            put(best_state)

    def _check_overfit(self) -> None:
        h = self.history
        if len(h) < 3 or h[-1]["phase"] != h[-3]["phase"] or h[-3]["val_map"] is None:
            return
        if any(w.startswith(OVERFIT_WARNING) for w in self.warnings):  # said once per training, not once per phase
            return
        if h[-1]["val_map"] < h[-2]["val_map"] < h[-3]["val_map"] and h[-1]["train_map"] > h[-3]["train_map"]:
            self.warnings.append(
                f"{OVERFIT_WARNING} (overfitting at epoch {h[-1]['epoch']}); the best validation epoch is kept"
            )


def _choose_cut(bb: Any, spec: Any, shares: tuple[float, ...], fitter: _HeadFit, state: _Loop,
                tune: Callable[[Any, _Loop, float, str], tuple[str, Any]]
                ) -> tuple[str | None, Any, Any, float, list[dict[str, Any]]]:  # fmt: skip
    """Fine-tune from each share's cut in turn and keep the best on held-out labels.

    Every cut starts from the same trained head, with its own early stopping against the head's best held-out mAP
    (so a later cut is not cut short by an earlier one); the cut with the best held-out epoch wins, or the head
    when none beats it. Shares that land on the same cut run once. Ctrl-C keeps the cuts already finished.
    Returns (cut name, backbone to export, its held-out metrics, its share, the cuts tried).
    """
    from .finetune import split_backbone

    history = state.history
    start, head_best = fitter.get(), state.best_map
    kept: dict[str, tuple] = {}
    tried: list[dict[str, Any]] = []
    seen_cuts: set[str] = set()
    try:
        for share_n in shares:
            name = split_backbone(bb.model, share_n)[2]
            if name in seen_cuts:
                continue
            seen_cuts.add(name)
            phase = "finetune" if len(shares) == 1 else f"finetune@{share_n:g}"
            fitter.put(start)
            bb_n = bb if not kept else spec.build()  # the first cut trains `bb` (restored if the head wins)
            run = _Loop(history, state.note, state.warnings)
            run.best_map = head_best  # a cut counts only when it beats the head
            cut_n, m_n = tune(bb_n, run, share_n, phase)
            best_n = run.best_map if any(h["phase"] == phase and h["best"] for h in history) else None
            kept[phase] = (bb_n, cut_n, m_n, fitter.get(), share_n, best_n)
            ran = [h for h in history if h["phase"] == phase and h.get("val_map") is not None]
            tried.append({"unfreeze": share_n, "cut": cut_n, "epochs": len(ran),
                          "val_map": max((h["val_map"] for h in ran), default=None)})  # fmt: skip
            if run.interrupted:
                state.interrupted = True
                break
    except KeyboardInterrupt:  # between epochs (views, a rebuild): the cuts already finished stay
        state.interrupted = True
    ranked = [(v[5], phase) for phase, v in kept.items() if v[5] is not None]
    if not ranked:  # the head alone won: the first cut's run restored `bb` and its own start
        fitter.put(start)
        first = next(iter(kept.values()), None)
        return (first[1] if first else None), bb, None, shares[0], tried
    won = max(ranked)[1]
    bb_w, cut_w, metrics_w, head_w, share_w, best_w = kept[won]
    fitter.put(head_w)
    state.best_map = best_w
    for h in history:  # the losing cuts' best epochs are not the model's
        if h["phase"] != won and h["phase"].startswith("finetune"):
            h["best"] = False
    return cut_w, bb_w, metrics_w, share_w, tried


def _finetune(bb: Any, spec: Any, data: LabelledSet, tr: np.ndarray, va: np.ndarray, y_tr: np.ndarray,
              y_va: np.ndarray, fitter: _HeadFit, cfg: dict, views: int, fit: str, seed: int, loss: str,
              weight_decay: float, rng: np.random.Generator, state: _Loop, note: TrainProgress,
              select: bool = True, augment: str = "light", unfreeze: float = 0.25,
              tta_views: tuple[str, ...] = ("plain",), phase: str = "finetune") -> tuple[str, Any]:  # fmt: skip
    """Phase 2: train the backbone's upper part with the head on cached activations of augmented views.

    `select=False` (refit): no validation views are computed and the held-out metrics returned are None. The
    held-out images are scored as the exported model embeds them: `tta_views` averaged.
    """
    head, loss_fn, head_vars = fitter.head, fitter.loss_fn, fitter.vars
    from ..models._keras import keras, tensorflow
    from .finetune import freeze_batchnorm, split_backbone, view_activations
    from .heads import batches

    k, tf = keras(), tensorflow()
    freeze_batchnorm(bb.model)
    lower, upper, cut = split_backbone(bb.model, unfreeze)
    prep = bb.preprocess
    size = spec.input_size
    paths = data.paths
    a_tr, ok_tr = view_activations(lower, prep, [paths[i] for i in tr], size, fit, views, seed,
                                   lambda ph, d, t: note("views", d, t, {}), augment=augment)  # fmt: skip
    va = va if select else va[:0]
    a_va, ok_va = view_activations(lower, prep, [paths[i] for i in va], size, fit, len(tta_views), seed,
                                   lambda ph, d, t: note("views-val", d, t, {}), fixed=tta_views)  # fmt: skip
    y_tr, y_va = y_tr[ok_tr], y_va[ok_va]
    up_vars = upper.trainable_variables
    opt_h = k.optimizers.AdamW(learning_rate=cfg["lr"], weight_decay=weight_decay)
    opt_b = k.optimizers.AdamW(learning_rate=cfg["backbone_lr"], weight_decay=weight_decay)
    norm = k.layers.UnitNormalization()

    @tf.function(reduce_retracing=True)
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            value = loss_fn(head(norm(upper(x, training=False)), training=True), y)
        grads = tape.gradient(value, head_vars + up_vars)
        opt_h.apply_gradients(zip(grads[: len(head_vars)], head_vars, strict=True))
        opt_b.apply_gradients(zip(grads[len(head_vars) :], up_vars, strict=True))
        return value

    @tf.function(reduce_retracing=True)
    def embed(x: Any) -> Any:
        return head(norm(upper(x, training=False)), training=False)

    def run_embed(acts: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(embed(acts[i : i + 256].astype(np.float32)))
                               for i in range(0, len(acts), 256)])  # fmt: skip

    sample = rng.permutation(len(a_tr))[:1000]

    def epoch() -> list[float]:
        out = []
        for b in batches(y_tr, cfg["batch_size"], loss, rng):
            v = rng.integers(0, views, size=len(b))
            out.append(float(step(a_tr[b, v].astype(np.float32), y_tr[b])))
        return out

    def embed_va() -> np.ndarray:
        return average_views([run_embed(a_va[:, j]) for j in range(a_va.shape[1])])

    def evaluate() -> tuple[float, float, float]:
        m = retrieval_metrics(embed_va(), y_va, target_precision=None)
        t = retrieval_metrics(run_embed(a_tr[sample, 0]), y_tr[sample], target_precision=None)
        return t.map, m.map, m.p_at_1

    all_vars = head_vars + up_vars
    state.run("refit-finetune" if not select else phase, cfg["epochs"], cfg["patience"], epoch,
              evaluate if select else None, lambda: [v.numpy().copy() for v in all_vars],
              lambda s: [v.assign(x) for v, x in zip(all_vars, s, strict=True)])  # fmt: skip
    return cut, retrieval_metrics(embed_va(), y_va) if select else None


def _write(out: Path, model: Any, manifest: dict[str, Any], history: list[dict[str, Any]], data: LabelledSet,
           sp: Split, va: np.ndarray, overwrite: bool) -> dict[str, Any]:  # fmt: skip
    """Write the MODEL_DIR next to `out` and move it into place, so a failed write never leaves half a model."""
    from ..models.model_dir import write_model_dir
    from .plot import plot_history

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(tmp, model, manifest)
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    val_files = sorted(os.path.relpath(data.paths[i], data.root) for i in va)
    (tmp / "split.json").write_text(json.dumps({"root": data.root, **sp.to_json(data), "val_files": val_files,
                                                "val_labels": sorted({data.labels[i] for i in va})}))  # fmt: skip
    plot_history(history, tmp / "training.png")
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise BadInputError(f"{out} already exists; pass --overwrite to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    from ..models.model_dir import read_manifest

    return read_manifest(out)


def _version() -> str:
    from .. import __version__

    return __version__
