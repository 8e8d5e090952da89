"""AE-SVC: an autoencoder whose latent space is constrained to be well behaved for cosine search.

Omama, Li and Chinchali, "Exploiting Distribution Constraints for Scalable and
Efficient Image Retrieval": foundation-model embeddings are dominated by a few
high-variance directions, so cosine similarity mostly measures those. The
autoencoder is trained, without labels, on a collection's embeddings with the
reconstruction loss plus three constraints on the latent batch ``z``:

* orthogonality: the off-diagonal entries of cov(z) go to 0;
* unit variance: the diagonal of cov(z) goes to 1, so every latent dimension
  weighs equally in a cosine;
* mean-centering: mean(z) goes to 0, so cosines are not all pushed up by a
  shared offset.

The paper shows these lower the variance of the cosine-similarity distribution
and argues that this makes retrieval more discriminative.

Two loss forms (``loss``):

* ``"paper"``: the paper's sum form with its reference weights, reconstruction
  25, covariance (orthogonality) 1, variance 15, mean 1: the squared
  off-diagonal covariances summed, the squared variance errors summed, the
  squared means summed.
* ``"finegrain"`` (default): the same terms normalised per latent dimension
  (covariance sum / k as in VICReg, the variance and mean terms as means over
  the k dimensions), weighted 25 / 0.1 / 0.1 / 1. For k latent dimensions the
  constraint terms weigh 1/(10 k), 1/(150 k) and 1/k of the paper's.

Reconstruction is the mean squared error of the standardised input in both.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, cast

import numpy as np
import torch

from . import _nn
from .base import Projection

#: The loss forms and the loss weights each uses when a ``*_weight`` parameter is left at ``None``.
LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "finegrain": {"reconstruction": 25.0, "covariance": 0.1, "variance": 0.1, "mean": 1.0},
    "paper": {"reconstruction": 25.0, "covariance": 1.0, "variance": 15.0, "mean": 1.0},
}


def constraint_losses(z: torch.Tensor, form: str = "finegrain") -> dict[str, torch.Tensor]:
    """The three latent constraints on a batch ``z`` (B, k), each 0 when satisfied exactly.

    With C = cov(z) (unbiased, 1/(B-1)) and m = mean(z):

    * ``form="paper"``: ``covariance`` = sum over i != j of C_ij^2;
      ``variance`` = sum over i of (C_ii - 1)^2; ``mean`` = sum over i of m_i^2.
    * ``form="finegrain"``: the same sums divided by k (the number of latent dimensions).
    """
    if form not in LOSS_WEIGHTS:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSS_WEIGHTS))}, got {form!r}")
    b, k = z.shape
    mean = z.mean(dim=0)
    zc = z - mean
    cov = zc.T @ zc / max(b - 1, 1)
    diag = torch.diagonal(cov)
    off_diagonal = cov - torch.diag_embed(diag)
    if form == "paper":
        return {
            "covariance": off_diagonal.pow(2).sum(),
            "variance": (diag - 1).pow(2).sum(),
            "mean": mean.pow(2).sum(),
        }
    return {
        "covariance": off_diagonal.pow(2).sum() / k,
        "variance": (diag - 1).pow(2).mean(),
        "mean": mean.pow(2).mean(),
    }


#: ``n_steps="auto"``: passes over the fitted data, and the bounds on the resulting step count.
AUTO_EPOCHS = 50
AUTO_MIN_STEPS = 100
AUTO_MAX_STEPS = 5000


def auto_steps(n_samples: int, batch_size: int) -> int:
    """Optimiser steps for ``n_steps="auto"``: ``AUTO_EPOCHS`` epochs of ``n_samples`` rows, clipped."""
    steps = math.ceil(AUTO_EPOCHS * n_samples / max(1, min(batch_size, n_samples)))
    return int(min(max(steps, AUTO_MIN_STEPS), AUTO_MAX_STEPS))


class AESVC(Projection):
    """Autoencoder with strong variance constraints (AE-SVC) as a scikit-learn transformer.

    ``transform`` returns the encoder's latent (L2-normalised when
    ``normalize``); the decoder exists only to train it.

    Parameters
    ----------
    n_components : int
        Latent (output) dimension, at most the input dimension.
    hidden_sizes : tuple of int
        Widths of the hidden layers of the encoder (the decoder mirrors them);
        ``()`` makes both linear.
    loss : {"finegrain", "paper"}
        Form of the constraint terms (see :func:`constraint_losses`):
        ``"paper"`` is AE-SVC as the paper defines it (sum form, reference
        weights 25/1/15/1); ``"finegrain"`` (default) normalises the terms
        per latent dimension and weights them 25/0.1/0.1/1.
    reconstruction_weight, covariance_weight, variance_weight, mean_weight : float or None
        Loss weights; ``None`` takes the weight of the chosen ``loss`` form
        (:data:`LOSS_WEIGHTS`). Reconstruction is the mean squared error of
        the standardised input (about the fraction of variance left
        unexplained), so the weights mean the same for any encoder. The
        finegrain defaults: see ``docs/compress.md`` for the ablation they come from.
    n_steps : int or "auto"
        Optimiser steps. ``"auto"`` (default): ``AUTO_EPOCHS`` passes over the
        data, at least ``AUTO_MIN_STEPS`` and at most ``AUTO_MAX_STEPS``. A
        fixed count over-trains small collections and under-trains large ones
        (class mAP in ``docs/compress.md``: on 1,238 images 150 steps beat 500
        and 1,500; on 7,238 images 1,500 beat 500); the cap bounds fit time.
    batch_size : int
        Rows per step; the covariance constraints are computed per batch, so
        it should be well above ``n_components``. Smaller inputs train full-batch.
    learning_rate : float
        Adam's initial rate, decayed by a cosine to 1% of it.
    normalize : bool
        L2-normalise output rows (finegrain scores by inner product).
    random_state : int or None
        Seed of weight initialisation and batching; the same seed, data and
        thread count give the same model.
    n_threads : int or None
        Torch threads while training (``None``: torch's current setting). One
        is fastest for these small layers on a shared machine.

    Attributes
    ----------
    encoder_ : torch.nn.Sequential
    mean_ : ndarray of shape (input_dim,)
        Input mean subtracted before the encoder.
    scale_ : float
        Global input scale divided out before the encoder.
    losses_ : dict of str to float
        Each loss term (unweighted, in the chosen form) over the whole fitted data at the end of training.
    loss_weights_ : dict of str to float
        The weights used (``None`` parameters resolved).
    fit_seconds_ : float
    n_steps_ : int
        Optimiser steps actually taken (resolves ``"auto"``).
    input_dim_, n_components_ : int

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(300, 32)).astype("float32")
    >>> AESVC(n_components=8, n_steps=50).fit_transform(X).shape
    (300, 8)
    """

    method = "aesvc"

    def __init__(
        self,
        n_components: int = 128,
        hidden_sizes: tuple[int, ...] = (512,),
        loss: str = "finegrain",
        reconstruction_weight: float | None = None,
        covariance_weight: float | None = None,
        variance_weight: float | None = None,
        mean_weight: float | None = None,
        n_steps: int | str = "auto",
        batch_size: int = 256,
        learning_rate: float = 3e-3,
        normalize: bool = True,
        random_state: int | None = 0,
        n_threads: int | None = 1,
    ) -> None:
        self.n_components = n_components
        self.hidden_sizes = hidden_sizes
        self.loss = loss
        self.reconstruction_weight = reconstruction_weight
        self.covariance_weight = covariance_weight
        self.variance_weight = variance_weight
        self.mean_weight = mean_weight
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.normalize = normalize
        self.random_state = random_state
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fit
    def _fit(self, X: np.ndarray) -> None:
        hidden = _nn.check_hidden_sizes(self.hidden_sizes)
        weights = self._weights()
        n, dim = X.shape
        k = self.n_components
        if n <= k:
            # A batch of n rows spans at most n-1 directions: unit variance in k decorrelated dims is unreachable.
            warnings.warn(f"AESVC: {n} samples cannot give {k} decorrelated unit-variance dimensions; "
                          "fit on more samples or lower n_components", RuntimeWarning, stacklevel=3)
        steps = self._steps(n)
        _nn.check_training(self.batch_size, self.learning_rate, steps)
        self.mean_, self.scale_ = _nn.standardizer(X)
        data = torch.from_numpy((X - self.mean_) / np.float32(self.scale_))
        start = time.perf_counter()
        with _nn.seeded(self.random_state, self.n_threads) as generator:
            encoder = _nn.mlp((dim, *hidden, k))
            decoder = _nn.mlp((k, *reversed(hidden), dim))

            def loss_of_batch(idx: torch.Tensor) -> torch.Tensor:
                terms = self._losses(encoder, decoder, data[idx])
                return cast(torch.Tensor, sum(weights[name] * value for name, value in terms.items()))

            _nn.train([*encoder.parameters(), *decoder.parameters()], loss_of_batch, n, self.batch_size, steps,
                      self.learning_rate, generator)
        encoder.eval()
        with torch.no_grad():
            self.losses_ = {name: float(v) for name, v in self._losses(encoder, decoder.eval(), data).items()}
        self.fit_seconds_ = time.perf_counter() - start
        self.n_steps_ = steps
        self.loss_weights_ = weights
        self.encoder_ = encoder
        self.n_components_ = k

    def _steps(self, n: int) -> int:
        if self.n_steps == "auto":
            return auto_steps(n, self.batch_size)
        if isinstance(self.n_steps, str) or int(self.n_steps) < 1:
            raise ValueError(f"n_steps must be a positive int or 'auto', got {self.n_steps!r}")
        return int(self.n_steps)

    def _weights(self) -> dict[str, float]:
        if self.loss not in LOSS_WEIGHTS:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSS_WEIGHTS))}, got {self.loss!r}")
        given = {"reconstruction": self.reconstruction_weight, "covariance": self.covariance_weight,
                 "variance": self.variance_weight, "mean": self.mean_weight}
        weights = {name: LOSS_WEIGHTS[self.loss][name] if w is None else w for name, w in given.items()}
        for name, w in weights.items():
            if not w >= 0:
                raise ValueError(f"{name}_weight must be >= 0, got {w!r}")
        if not any(weights.values()):
            raise ValueError("at least one loss weight must be positive")
        return weights

    def _losses(self, encoder: torch.nn.Module, decoder: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = encoder(x)
        return {"reconstruction": (decoder(z) - x).pow(2).mean(), **constraint_losses(z, self.loss)}

    # ------------------------------------------------------------- transform
    def _project(self, X: np.ndarray) -> np.ndarray:
        return _nn.run(self.encoder_, X, self.mean_, self.scale_)

    # ------------------------------------------------------------- save/load
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"mean": self.mean_, **_nn.state_arrays(self.encoder_, "encoder")}
        return arrays, {"scale_": self.scale_, "losses_": self.losses_, "fit_seconds_": self.fit_seconds_,
                        "n_steps_": self.n_steps_, "loss_weights_": self.loss_weights_}

    def _set_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self.mean_ = arrays["mean"]
        self.scale_ = float(info["scale_"])
        self.losses_ = info["losses_"]
        self.fit_seconds_ = info["fit_seconds_"]
        self.n_steps_ = int(info.get("n_steps_", self.n_steps))  # files from before "auto" record only n_steps
        # Files from before ``loss`` store numeric weights in the parameters, which resolve to the same.
        self.loss_weights_ = info.get("loss_weights_") or self._weights()
        self.encoder_ = _nn.mlp((self.input_dim_, *_nn.check_hidden_sizes(self.hidden_sizes), self.n_components_))
        _nn.load_arrays(self.encoder_, arrays, "encoder")
        self.encoder_.eval()
