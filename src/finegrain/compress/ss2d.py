"""(SS)2D: single-shot similarity-space distillation into nested embedding sizes.

Omama, Li and Chinchali, "Exploiting Distribution Constraints for Scalable and
Efficient Image Retrieval": one student network is trained once so that, for
every size d in a nested list, its first d output dimensions reproduce the
teacher's similarity structure. The match is the KL divergence between each
row of the batch's softmax-normalised cosine-similarity matrix under the
teacher and under the student's first d dimensions. A search can then pick any
trained size (smaller and faster, or larger and better) from one stored model.

The teacher is by default an :class:`~finegrain.compress.AESVC` fitted on the
same data (the paper's pipeline); any projection or precomputed teacher
embeddings work too. The student reads the original embeddings, so at search
time the teacher is not needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import clone

from . import _nn
from .base import Projection, _as_matrix

DEFAULT_DIMS = (16, 32, 64, 128, 256)


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean KL(teacher || student) between the rows of softmax(cosine similarity / temperature).

    Each row is one item's similarities to the rest of the batch; the item's
    similarity to itself (always 1) is left out so it does not dominate.
    """
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    eye = torch.eye(len(s), dtype=torch.bool)
    log_p_student = F.log_softmax((s @ s.T / temperature).masked_fill(eye, float("-inf")), dim=1)
    log_p_teacher = F.log_softmax((t @ t.T / temperature).masked_fill(eye, float("-inf")), dim=1)
    # The masked diagonal holds -inf in both; it contributes 0, not NaN.
    terms = torch.exp(log_p_teacher) * (log_p_teacher - log_p_student)
    return terms.masked_fill(eye, 0.0).sum(dim=1).mean()


class SS2D(Projection):
    """Single-shot similarity-space distillation: one model, any output size up to ``n_components``.

    Parameters
    ----------
    n_components : int
        Largest (and default) output size; at most the input dimension.
    dims : sequence of int or None
        Nested sizes trained explicitly. ``None``: those of (16, 32, 64, 128,
        256) below ``n_components``, plus ``n_components``. Other sizes up to
        ``n_components`` still work in ``transform`` but are not optimised for.
    teacher : "aesvc", None or a Projection
        Whose similarity space to distil when ``fit`` gets no
        ``teacher_embeddings``: ``"aesvc"`` fits ``AESVC(n_components)`` on
        the same data (the paper's pipeline); ``None`` distils the input's own
        cosine space; an (unfitted or fitted) projection is fitted on the data
        if needed and used. Only its name is saved with the student.
    hidden_sizes : tuple of int
        Hidden layer widths of the student; ``()`` makes it linear.
    temperature : float
        Softmax temperature of the similarity rows: lower focuses the match on
        each item's nearest neighbours.
    n_steps, batch_size, learning_rate :
        Adam steps, rows per step (the similarity rows span the batch), initial rate.
    normalize : bool
        L2-normalise output rows after truncation to the chosen size.
    random_state : int or None
        Seed of the teacher, weight initialisation and batching.
    n_threads : int or None
        Torch threads while training (teacher included); see :class:`AESVC`.

    Attributes
    ----------
    student_ : torch.nn.Sequential
    dims_ : tuple of int
        The sizes trained, ascending; the last is ``n_components_``.
    mean_, scale_ :
        Input standardisation, as in :class:`AESVC`.
    teacher_ : Projection or None
        The fitted teacher (None when it was given as embeddings or is the input itself); not saved.
    losses_ : dict of str to float
        Final KL per trained size on (a sample of) the fitted data.
    fit_seconds_ : float
        Training time of the student (the teacher's fit not included).
    input_dim_, n_components_ : int
    """

    method = "ss2d"

    def __init__(
        self,
        n_components: int = 256,
        dims: Sequence[int] | None = None,
        teacher: str | Projection | None = "aesvc",
        hidden_sizes: tuple[int, ...] = (512,),
        temperature: float = 0.05,
        n_steps: int = 500,
        batch_size: int = 256,
        learning_rate: float = 3e-3,
        normalize: bool = True,
        random_state: int | None = 0,
        n_threads: int | None = 1,
    ) -> None:
        self.n_components = n_components
        self.dims = dims
        self.teacher = teacher
        self.hidden_sizes = hidden_sizes
        self.temperature = temperature
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.normalize = normalize
        self.random_state = random_state
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fit
    def fit(self, X: np.ndarray, y: Any = None, teacher_embeddings: np.ndarray | None = None) -> SS2D:
        """Train the student on rows of ``X``; ``teacher_embeddings`` (n, m) overrides ``teacher``."""
        return self._fit_validated(X, teacher_embeddings)

    def fit_transform(self, X: np.ndarray, y: Any = None, teacher_embeddings: np.ndarray | None = None,
                      dim: int | None = None) -> np.ndarray:
        """``fit`` then ``transform`` the same rows (at size ``dim``)."""
        return self.fit(X, y, teacher_embeddings).transform(X, dim=dim)

    def _fit(self, X: np.ndarray, teacher_embeddings: np.ndarray | None = None) -> None:
        hidden = _nn.check_hidden_sizes(self.hidden_sizes)
        dims = self._check_dims()
        _nn.check_training(self.batch_size, self.learning_rate, self.n_steps)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        teacher = self._teacher_output(X, teacher_embeddings)
        self.mean_, self.scale_ = _nn.standardizer(X)
        data = torch.from_numpy((X - self.mean_) / np.float32(self.scale_))
        target = torch.from_numpy(teacher)
        start = time.perf_counter()
        with _nn.seeded(self.random_state, self.n_threads) as generator:
            student = _nn.mlp((X.shape[1], *hidden, dims[-1]))

            def loss_of_batch(idx: torch.Tensor) -> torch.Tensor:
                out, t = student(data[idx]), target[idx]
                # Every nested size shares the leading dimensions, so each loss shapes them all.
                return cast(torch.Tensor, sum(similarity_kl(out[:, :d], t, self.temperature) for d in dims) / len(dims))

            _nn.train(student.parameters(), loss_of_batch, len(X), self.batch_size, self.n_steps, self.learning_rate,
                      generator)
            student.eval()
            with torch.no_grad():
                idx = next(_nn.batches(len(X), 2048, 1, generator))  # a sample: the similarity matrix is quadratic
                out = student(data[idx])
                self.losses_ = {str(d): float(similarity_kl(out[:, :d], target[idx], self.temperature)) for d in dims}
        self.fit_seconds_ = time.perf_counter() - start
        self.student_ = student
        self.dims_ = dims
        self.n_components_ = dims[-1]

    def _check_dims(self) -> tuple[int, ...]:
        k = int(self.n_components)
        if self.dims is None:
            return tuple(d for d in DEFAULT_DIMS if d < k) + (k,)
        dims = sorted({int(d) for d in self.dims})
        if not dims or dims[0] < 1 or dims[-1] > k:
            raise ValueError(f"dims must be positive sizes up to n_components={k}, got {self.dims!r}")
        return tuple(dims) if dims[-1] == k else (*dims, k)

    def _teacher_output(self, X: np.ndarray, teacher_embeddings: np.ndarray | None) -> np.ndarray:
        """The teacher's rows for ``X``; sets ``teacher_`` (the fitted teacher projection, or None)."""
        self.teacher_ = None
        if teacher_embeddings is not None:
            target = _as_matrix(teacher_embeddings)
            if len(target) != len(X):
                raise ValueError(f"teacher_embeddings has {len(target)} rows but X has {len(X)}")
            return target
        teacher = self.teacher
        if teacher is None:
            # The input's own cosine space, centred as every projection centres it.
            return X - X.mean(axis=0)
        if isinstance(teacher, str):
            from . import create_projection

            if teacher == self.method:
                raise ValueError("an SS2D cannot be its own teacher")
            params = {"n_threads": self.n_threads} if teacher == "aesvc" else {}
            teacher = create_projection(teacher, self.n_components, random_state=self.random_state, **params)
        elif not isinstance(teacher, Projection):
            raise TypeError(f"teacher must be a method name, a Projection or None, got {type(teacher).__name__}")
        elif not hasattr(teacher, "input_dim_"):
            teacher = clone(teacher)  # fit a copy: the caller's parameter object stays as given
        if not hasattr(teacher, "input_dim_"):
            teacher.fit(X)
        self.teacher_ = teacher
        return teacher.transform(X)

    def _saved_params(self) -> dict[str, Any]:
        params = self.get_params(deep=False)
        if isinstance(params["teacher"], Projection):
            params["teacher"] = params["teacher"].method
        if params["dims"] is not None:
            params["dims"] = [int(d) for d in params["dims"]]
        return params

    # ------------------------------------------------------------- transform
    def transform(self, X: np.ndarray, dim: int | None = None) -> np.ndarray:
        """Project rows of ``X`` to their first ``dim`` student dimensions (default ``n_components_``).

        Any ``dim`` from 1 to ``n_components_`` works; those in ``dims_`` were
        trained for. Rows are L2-normalised after truncation when ``normalize``.
        """
        X = self._check_transform_input(X)
        dim = self.n_components_ if dim is None else dim
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or not 1 <= dim <= self.n_components_:
            raise ValueError(f"dim must be an integer from 1 to {self.n_components_}, got {dim!r}")
        return self._finish(self._project(X)[:, :dim])

    def _project(self, X: np.ndarray) -> np.ndarray:
        return _nn.run(self.student_, X, self.mean_, self.scale_)

    # ------------------------------------------------------------- save/load
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"mean": self.mean_, **_nn.state_arrays(self.student_, "student")}
        info = {"scale_": self.scale_, "dims_": list(self.dims_), "losses_": self.losses_,
                "fit_seconds_": self.fit_seconds_}
        return arrays, info

    def _set_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self.mean_ = arrays["mean"]
        self.scale_ = float(info["scale_"])
        self.dims_ = tuple(info["dims_"])
        self.losses_ = info["losses_"]
        self.fit_seconds_ = info["fit_seconds_"]
        self.student_ = _nn.mlp((self.input_dim_, *_nn.check_hidden_sizes(self.hidden_sizes), self.n_components_))
        _nn.load_arrays(self.student_, arrays, "student")
        self.student_.eval()
