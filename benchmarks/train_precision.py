"""Mixed precision for fine-tuning on this CPU: a training step of Lite0's upper part (+ a head) and the frozen
lower part's forward pass, in float32 and under Keras' mixed policies, each in its own child process (a policy is
global), side by side in one run.

    python benchmarks/train_precision.py [--unfreeze 0.25,0.6] [--batch 64] [--policies float32,mixed_bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
policy, share, batch = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
from simsearch.models._keras import keras, tensorflow
k, tf = keras(), tensorflow()
if policy != "float32":
    k.mixed_precision.set_global_policy(policy)
from simsearch.models.backbones import resolve_backbone
from simsearch.training.finetune import freeze_batchnorm, split_backbone
bb = resolve_backbone("efficientnet-lite0", "imagenet").build()
freeze_batchnorm(bb.model)
lower, upper, cut = split_backbone(bb.model, share)
x = tf.constant(bb.preprocess(np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3))).astype(np.float32))
lower_fn = tf.function(lambda z: lower(z))
acts = lower_fn(x)
head = k.Sequential([k.layers.Dense(256, dtype="float32")])
opt = k.optimizers.AdamW(1e-4)
head(tf.cast(upper(acts), tf.float32))
params = upper.trainable_variables + head.trainable_variables

@tf.function
def step(a):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(head(tf.cast(upper(a, training=False), tf.float32))))
    opt.apply_gradients(zip(tape.gradient(loss, params), params))
    return loss

def timed(fn, reps):
    fn(); fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000

print(json.dumps({"policy": policy, "unfreeze": share, "cut": cut, "step_ms": timed(lambda: step(acts), 10),
                  "lower_ms": timed(lambda: lower_fn(x), 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unfreeze", default="0.25,0.6")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--policies", default="float32,mixed_bfloat16")
    args = ap.parse_args()
    print(f"{'unfreeze':>8}  {'cut':<20}{'policy':<16}{'train step':>12}{'lower pass':>12}   (batch {args.batch})")
    for share in args.unfreeze.split(","):
        base = None
        for policy in args.policies.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), policy, share, str(args.batch)],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            base = base or r
            print(
                f"{share:>8}  {r['cut']:<20}{policy:<16}{r['step_ms']:>9.0f} ms{r['lower_ms']:>9.0f} ms   "
                f"step {r['step_ms'] / base['step_ms']:.2f}x, lower {r['lower_ms'] / base['lower_ms']:.2f}x"
            )


if __name__ == "__main__":
    main()
