"""Readers for the evaluation data sets (layouts as in ``../shared/data``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .eval.revisitop import RevisitopGnd


@dataclass(frozen=True)
class CaptionSplit:
    """One split of a captioned image set.

    ``captions[i]`` describes ``images[caption_image[i]]``.
    """

    root: Path
    images: list[str]  # file names, relative to root/images
    captions: list[str]
    caption_image: list[int]

    def image_paths(self) -> list[Path]:
        return [self.root / "images" / name for name in self.images]


def load_flickr8k(root: str | Path, split: str) -> CaptionSplit:
    """Read ``splits/<split>.txt`` and ``captions.tsv`` of a Flickr8k-style folder.

    Raises ``FileNotFoundError`` naming the missing file (for example a
    ``test`` split that this copy of the data does not have).
    """
    root = Path(root)
    split_file = root / "splits" / f"{split}.txt"
    if not split_file.exists():
        have = sorted(p.stem for p in (root / "splits").glob("*.txt"))
        raise FileNotFoundError(f"no split '{split}' in {root} "
                                f"(expected {split_file}; available: {', '.join(have) or 'none'})")
    images = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    position = {name: i for i, name in enumerate(images)}
    captions: list[str] = []
    caption_image: list[int] = []
    with open(root / "captions.tsv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["image", "caption_id", "caption"]:
            raise ValueError(f"unexpected captions.tsv header: {header}")
        for row in reader:
            if len(row) >= 3 and row[0] in position and row[2].strip():
                captions.append(row[2].strip())
                caption_image.append(position[row[0]])
    return CaptionSplit(root, images, captions, caption_image)


@dataclass(frozen=True)
class RevisitopSet:
    """A Revisited Oxford/Paris-style set: database, cropped queries, optional distractors.

    Database image ``i`` is ``db_paths[i]`` (``gnd.imlist`` order, the indices
    the ground truth uses); distractors come after them and are never relevant.
    """

    gnd: RevisitopGnd
    db_paths: list[Path]
    query_paths: list[Path]
    query_boxes: list[list[float] | None]
    distractor_paths: list[Path]

    @property
    def landmarks(self) -> list[str]:
        """Landmark of each database image: the second ``_``-separated part of its name (``paris_defense_000000``)."""
        return [name.split("_")[1] if name.count("_") >= 2 else name for name in self.gnd.imlist]


def read_path_list(path: str | Path) -> list[Path]:
    """Image paths listed one per line in a text file (blank lines skipped; relative to the file's folder).

    Raises ``FileNotFoundError`` naming how many listed files are missing.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text list of image paths (one per line)") from None
    paths = [p if p.is_absolute() else path.parent / p for p in (Path(x.strip()) for x in lines if x.strip())]
    absent = [p for p in paths if not p.exists()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of the {len(paths)} images listed in {path} are missing, "
                                f"e.g. {absent[0]}")
    return paths


def load_revisitop(data: str | Path, gnd_file: str | Path | None = None, distractors: str | Path | None = None,
                   distractor_list: str | Path | None = None) -> RevisitopSet:
    """Read a revisitop folder (``jpg/`` plus a ``gnd_*.pkl``/``.json``) and optional distractors.

    ``distractors`` is a folder of images (walked recursively); with
    ``distractor_list`` (one name per line, relative to that folder, e.g.
    Flickr8k's ``splits/dev.txt``) only the listed images are used.
    ``distractors`` may also be a text file of image paths, one per line
    (relative ones are relative to the file's folder), used in list order.
    """
    from .eval.revisitop import db_image_path, find_gnd_file, load_gnd, query_image_path
    from .indexer import collect_files

    data = Path(data)
    gnd = load_gnd(gnd_file or find_gnd_file(data))
    db = [db_image_path(data, name) for name in gnd.imlist]
    queries = [query_image_path(data, name) for name in gnd.qimlist]
    missing = [p for p in db + queries if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the ground truth are missing from {data / 'jpg'}, "
                                f"e.g. {missing[0]}")
    extra: list[Path] = []
    if distractors is not None and Path(distractors).is_file():
        if distractor_list is not None:
            raise ValueError(f"--distractor-list needs --distractors to be a folder; {distractors} is a file "
                             "(give the list itself as --distractors)")
        extra = read_path_list(distractors)
        if not extra:
            raise FileNotFoundError(f"no distractor images listed in {distractors}")
    elif distractors is not None:
        root = Path(distractors)
        if distractor_list is not None:
            names = [line.strip() for line in Path(distractor_list).read_text().splitlines() if line.strip()]
            extra = [root / name for name in names]
            absent = [p for p in extra if not p.exists()]
            if absent:
                raise FileNotFoundError(f"{len(absent)} listed distractors are missing, e.g. {absent[0]}")
        else:
            files, _ = collect_files([root])
            extra = [Path(f) for f in files]
        if not extra:
            raise FileNotFoundError(f"no distractor images found in {root}")
    return RevisitopSet(gnd, db, queries, [g["bbx"] for g in gnd.gnd], extra)
