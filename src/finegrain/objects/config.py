"""Settings of the small-object (MaO) decomposition, stored with an index and fixed at creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PROPOSERS = ("regions", "yolox")
SPACES = ("raw", "joint")
#: Stage B objectives (see finegrain.objects.refine) and the Adam step each uses when ``lr`` is not given.
REFINE_VARIANTS = ("finegrain", "paper")
DEFAULT_LR = {"finegrain": 1e-3, "paper": 0.1}


@dataclass(frozen=True)
class ObjectConfig:
    """How an index decomposes images into objects and describes them.

    Parameters
    ----------
    proposals:
        ``regions`` (default): Felzenszwalb graph-merged colour regions
        (scikit-image), no extra weights. ``yolox``: YOLOX-Nano COCO ONNX
        model run by onnxruntime, class-agnostic (optional extra ``yolox``).
    max_objects:
        Cap on proposals per image (the whole image comes on top of them).
    threshold:
        ``yolox`` only: minimum objectness x best class score (paper: 0.2).
    pad:
        Margin added on each side of an object's box before cropping, as a
        fraction of the box's longer side.
    min_crop:
        Minimum crop side in pixels of the original image. The paper uses the
        backbone input size (224); 0 (default) keeps tight crops, which work
        much better for objects of 1-4 % of the image (see docs/mao.md).
    crop_size:
        Side in pixels each crop is resized to before encoding (and the query).
        192 (default) was chosen among 96, 128, 160, 192 on Stage-A validation
        composites of Flickr8k train images (docs/mao.md); encoding cost
        grows with its square.
    pool_p:
        Exponent of the generalised mean that fuses an image's crop vectors
        into its one descriptor (``raw`` space; values are non-negative).
        1 is the paper's plain average; a larger p lets an object that
        fires a channel strongly keep it in the descriptor. 8 (default) was
        chosen among 1, 2, 3, 5, 8 on Stage-A validation composites made only
        of Flickr8k train images (docs/mao.md). ``joint`` space always averages.
    space:
        ``raw``: the image tower's feature map GeM-pooled (p = 3), 1280-d for
        effnet-minilm, image queries only. ``joint``: pooled then projected
        into the text-image space (text queries work too, instances match worse).
    refine_iters:
        Stage B attention-map refinement steps per image (0: off, paper: 80).
    refine_objects:
        At most this many objects (the first proposals in the proposer's
        order: most compact regions first for ``regions``, highest score
        first for ``yolox``) enter the refinement.
    refine_variant:
        Stage B objective. ``finegrain`` (default): starts from the
        ``pool_p`` descriptor, averages the IoU term over objects, anchors to
        the sum of all crop vectors (whole image included). ``paper``: the
        MaO paper's objective: starts from the plain average of the object
        crops, sums the IoU term over objects, anchors to the object crops
        only (see :mod:`finegrain.objects.refine`).
    alpha:
        Weight of the refinement's pull towards the anchor (paper: 0.03).
    lr:
        Refinement step size (Adam). ``None``: the variant's, 1e-3 for
        ``finegrain`` (the paper's 0.1 destroys the raw 1280-d descriptors,
        see docs/mao.md), 0.1 for ``paper``. Stored resolved.
    seg_side:
        Side of the image copy the ``regions`` proposer segments.
    adapter:
        SHA-256 of a Stage A adapter (``finegrain train-objects``) applied to
        every crop vector and object query; the index keeps its copy of the
        file (:mod:`finegrain.objects.adapter`). ``None`` (default): none.
        Needs ``space="raw"`` and no refinement.
    """

    proposals: str = "regions"
    max_objects: int = 24
    threshold: float = 0.2
    pad: float = 0.1
    min_crop: int = 0
    crop_size: int = 192
    pool_p: float = 8.0
    space: str = "raw"
    refine_iters: int = 0
    refine_objects: int = 24
    alpha: float = 0.03
    lr: float | None = None
    seg_side: int = 224
    refine_variant: str = "finegrain"
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.refine_variant not in REFINE_VARIANTS:
            raise ValueError(f"refine_variant must be one of {REFINE_VARIANTS}, not {self.refine_variant!r}")
        if self.lr is None:  # frozen: resolve once, so the stored settings name the step actually used
            object.__setattr__(self, "lr", DEFAULT_LR[self.refine_variant])
        if self.proposals not in PROPOSERS:
            raise ValueError(f"object proposals must be one of {PROPOSERS}, not {self.proposals!r}")
        if self.space not in SPACES:
            raise ValueError(f"object descriptor space must be one of {SPACES}, not {self.space!r}")
        if int(self.max_objects) < 0:
            raise ValueError("max_objects must be >= 0")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError("threshold must be between 0 and 1")
        if not 0.0 <= float(self.pad) <= 2.0:
            raise ValueError("pad must be between 0 and 2")
        if int(self.min_crop) < 0:
            raise ValueError("min_crop must be >= 0")
        if not 32 <= int(self.crop_size) <= 1024:
            raise ValueError("crop_size must be between 32 and 1024")
        if not 1.0 <= float(self.pool_p) <= 50.0:
            raise ValueError("pool_p must be between 1 and 50")
        if int(self.refine_iters) < 0 or int(self.refine_objects) < 0:
            raise ValueError("refine_iters and refine_objects must be >= 0")
        if float(self.alpha) < 0 or float(self.step_size) <= 0:
            raise ValueError("alpha must be >= 0 and lr > 0")
        if not 32 <= int(self.seg_side) <= 1024:
            raise ValueError("seg_side must be between 32 and 1024")
        if self.adapter is not None:
            if not (isinstance(self.adapter, str) and len(self.adapter) == 64
                    and all(c in "0123456789abcdef" for c in self.adapter)):
                raise ValueError("the object adapter setting must be a SHA-256 (64 lower-case hex digits)")
            if self.space != "raw" or self.refine:  # it adapts raw crop vectors; Stage B reads the unadapted maps
                raise ValueError("an object adapter needs the raw object space and no refinement (--refine-iters 0)")

    def check_available(self) -> None:
        """Raise :class:`~finegrain.objects.proposals.ProposerUnavailable` (naming the extra to install) if
        the proposer cannot run in this environment; checked before an index is created or added to."""
        if self.proposals == "yolox":
            from .proposals import yolox_available

            yolox_available()

    @property
    def refine(self) -> bool:
        """Whether the index stores Stage B refined descriptors."""
        return self.refine_iters > 0

    @property
    def step_size(self) -> float:
        """The refinement's Adam step (``lr`` resolved)."""
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.refine_variant])

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["refine_variant"] == "finegrain":
            # The default is not written, so settings saved before the option existed (indexes,
            # Stage A cache keys) read and compare the same.
            del d["refine_variant"]
        if d["adapter"] is None:  # likewise: indexes without an adapter keep their stored settings
            del d["adapter"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ObjectConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown object settings: {sorted(unknown)}")
        return cls(**d)
