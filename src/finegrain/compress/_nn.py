"""Small torch pieces shared by the learned projections (AE-SVC and (SS)2D)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``sizes`` with GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def check_hidden_sizes(hidden_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(hidden_sizes)
    if any(not isinstance(h, (int, np.integer)) or h < 1 for h in sizes):
        raise ValueError(f"hidden_sizes must be positive integers, got {hidden_sizes!r}")
    return tuple(int(h) for h in sizes)


def check_training(batch_size: object, learning_rate: object, n_steps: object = 1) -> None:
    """Refuse a schedule that would train on nothing or on NaNs rather than fail later or fit garbage."""
    def positive_int(v: object) -> bool:
        return bool(not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1)

    # A batch's covariance (AE-SVC) and its similarity distributions (SS2D) need at least two rows.
    if not positive_int(batch_size) or int(batch_size) < 2:  # type: ignore[call-overload]
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if not positive_int(n_steps):
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.floating)) \
            or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")


def standardizer(X: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean and one global scale that give the rows zero mean and unit variance per dimension on average.

    One scale for all dimensions (not one each) keeps the geometry of the
    embedding space; it only makes the learning rate and loss weights mean
    the same thing for any encoder's scale.
    """
    mean = X.mean(axis=0, dtype=np.float64)
    var = float(((X - mean) ** 2).mean())
    return mean.astype(np.float32), math.sqrt(var) if var > 0 else 1.0


@contextlib.contextmanager
def seeded(random_state: int | None, n_threads: int | None = None) -> Iterator[torch.Generator]:
    """Seed weight initialisation and batching without touching the caller's global torch RNG.

    With ``n_threads`` torch uses at most that many threads inside the block
    (restored after). Training these small layers gains little from more
    threads, and on a busy machine extra spinning threads make it many times
    slower (measured: 100 steps took 21 s on one thread, 163 s on two, on a
    shared 2-core machine).
    """
    seed = 0 if random_state is None else int(random_state)
    before = torch.get_num_threads()
    if n_threads is not None:
        if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        torch.set_num_threads(int(n_threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(before)


def batches(n: int, batch_size: int, n_steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``n_steps`` index batches, walking through shuffled epochs (the whole set when it is smaller than a batch)."""
    batch_size = min(batch_size, n)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(n_steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def train(params, loss_of_batch: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int, n_steps: int,
          lr: float, generator: torch.Generator) -> None:
    """``n_steps`` Adam steps on ``loss_of_batch(row indices)`` over :func:`batches` of ``n`` rows.

    The rate decays by a cosine to 1% of ``lr``: the constraints settle in the low-rate tail.
    """
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_steps, 1), eta_min=lr * 0.01)
    for idx in batches(n, batch_size, n_steps, generator):
        loss = loss_of_batch(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def state_arrays(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_arrays(module: nn.Module, arrays: dict[str, np.ndarray], prefix: str) -> None:
    state = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v))
             for k, v in arrays.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)


def run(module: nn.Module, X: np.ndarray, mean: np.ndarray, scale: float, batch_size: int = 4096) -> np.ndarray:
    """Apply ``module`` to standardised rows of ``X`` in inference mode, in batches."""
    module.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            x = torch.from_numpy((X[start:start + batch_size] - mean) / np.float32(scale))
            out.append(module(x).numpy())
    if not out:
        return np.zeros((0, module[-1].out_features), np.float32)  # type: ignore[index, arg-type]
    return np.concatenate(out)
