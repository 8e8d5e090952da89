"""More AE-SVC knobs on both landmark folds at 128 dims (issue 17, fold A's 128-d goal).

After the batch x length grid (``experiments.aesvc_batch_grid``) the best
128-d setting was batch 1,024 with 100 passes (fold A 87.40, goal 88.76).
This script asks whether anything else moves it: a larger batch (2,048 rows,
the same number of steps or twice as many), an exponential moving average of
the weights (decay 0.99, used as the final model), other learning rates
(1e-3, 6e-3, 1e-2; the default is 3e-3), a deeper or wider-and-deeper encoder
(two hidden layers of 512 or 1,024), and the latent size itself (256 and
512). Both folds are printed for every setting, so this is an exploration,
not a choice.

Vectors: the bench index of ``finegrain bench compress`` (rparis6k-mini, the
7,000 Flickr8k train + dev images as distractors, fit on all 7,238 rows);
``loss="finegrain"``, seed 0, one torch thread. One JSON line per fit.

Usage::

    python -m experiments.aesvc_more_knobs [--data ../shared/data] [--cache-dir DIR] [--settings JSON ...]

Each ``--settings`` item is a JSON object with any of ``batch``, ``epochs``,
``lr``, ``ema``, ``hidden_sizes``, ``dim``, ``seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from experiments.aesvc_batch_grid import landmark_vectors
from finegrain.compress import _nn, create_projection

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SETTINGS = [
    {"batch": 1024, "epochs": 100},
    {"batch": 2048, "epochs": 200},
    {"batch": 2048, "epochs": 400},
    {"batch": 1024, "epochs": 100, "ema": 0.99},
    {"batch": 1024, "epochs": 100, "lr": 1e-3},
    {"batch": 1024, "epochs": 100, "lr": 6e-3},
    {"batch": 1024, "epochs": 100, "lr": 1e-2},
    {"batch": 1024, "epochs": 100, "hidden_sizes": [512, 512]},
    {"batch": 1024, "epochs": 100, "hidden_sizes": [1024, 1024]},
    {"batch": 1024, "epochs": 100, "dim": 256},
    {"batch": 1024, "epochs": 100, "dim": 512},
]

#: The EMA decay of the fit in progress (None: the product's plain training loop).
_EMA: dict[str, float | None] = {"decay": None}
_plain_train = _nn.train


def _train_with_ema(params, loss_of_batch, n, batch_size, n_steps, lr, generator) -> None:
    """The product's loop (Adam, cosine decay) keeping an EMA of the weights, copied in at the end."""
    decay = _EMA["decay"]
    if decay is None:
        _plain_train(params, loss_of_batch, n, batch_size, n_steps, lr, generator)
        return
    params = list(params)
    shadow = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_steps, 1), eta_min=lr * 0.01)
    for idx in _nn.batches(n, batch_size, n_steps, generator):
        loss = loss_of_batch(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for s, p in zip(shadow, params):
                s.mul_(decay).add_(p.detach(), alpha=1 - decay)
    with torch.no_grad():
        for s, p in zip(shadow, params):
            p.copy_(s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "finegrain" / "bench")
    parser.add_argument("--settings", nargs="+", type=json.loads, default=DEFAULT_SETTINGS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _nn.train = _train_with_ema  # AESVC looks the loop up at fit time
    X, present, score = landmark_vectors(args.data, args.cache_dir)
    fit = X[present]

    for setting in args.settings:
        batch = int(setting.get("batch", 256))
        steps = math.ceil(setting.get("epochs", 50) * len(fit) / min(batch, len(fit)))
        _EMA["decay"] = setting.get("ema")
        extra = {"hidden_sizes": tuple(setting["hidden_sizes"])} if "hidden_sizes" in setting else {}
        start = time.perf_counter()
        p = create_projection("aesvc", int(setting.get("dim", 128)), random_state=int(setting.get("seed", 0)),
                              batch_size=batch, n_steps=steps, learning_rate=float(setting.get("lr", 3e-3)),
                              **extra).fit(fit)
        scores = score(p.transform)
        print(json.dumps({**setting, "steps": steps,
                          **{f"class_map_{f}": round(v["class_map"], 2) for f, v in scores.items()},
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
