"""`finegrain duplicates`: exact, near (edited, rotated, mirrored copies) and similar (a real stereo pair) groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.duplicates import find_duplicates, parse_transforms, pixel_scores, pixel_signature, write_html
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)

EDITED = {  # original -> the edit its copy gets
    "coffee": "jpeg30", "astronaut": "rot90", "rocket": "mirror", "camera": "half", "coins": "crop90",
}


def _edit(image: Image.Image, how: str) -> tuple[Image.Image, int]:
    w, h = image.size
    if how == "jpeg30":
        return image, 30
    if how == "rot90":
        return image.transpose(Image.ROTATE_90), 90
    if how == "mirror":
        return image.transpose(Image.FLIP_LEFT_RIGHT), 90
    if how == "half":
        return image.resize((w // 2, h // 2)), 90
    return image.crop((w // 20, h // 20, w - w // 20, h - h // 20)), 90  # a 90% centre crop


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos_dir) -> Path:
    from skimage import data

    root = tmp_path_factory.mktemp("dups") / "photos"
    shutil.copytree(photos_dir, root)
    shutil.copy(root / "chelsea.jpg", root / "chelsea-exact.jpg")
    for name, how in EDITED.items():
        copy, quality = _edit(Image.open(root / f"{name}.jpg").convert("RGB"), how)
        copy.save(root / f"{name}-{how}.jpg", quality=quality)
    left, right, _ = data.stereo_motorcycle()  # two real views of one scene, a camera moved: "similar", not "near"
    Image.fromarray(left).save(root / "motorcycle-left.jpg", quality=90)
    Image.fromarray(right).save(root / "motorcycle-right.jpg", quality=90)
    Image.fromarray(data.hubble_deep_field()).save(root / "hubble.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def index_path(folder) -> Path:
    path = folder.parent / "index"
    with Index.create(path) as index:
        index.add([folder])
    return path


def _names(index, ids) -> set[str]:
    return {Path(index.records[i].path).stem for i in ids}


def test_groups_exact_near_and_similar(index_path):
    with Index.open(index_path) as index:
        report = find_duplicates(index)
        groups = [(g["kind"], _names(index, g["ids"])) for g in report.groups]
    assert ("exact", {"chelsea", "chelsea-exact"}) in groups
    near = [names for kind, names in groups if kind == "near"]
    for name, how in EDITED.items():
        assert {name, f"{name}-{how}"} in near, (name, groups)
    assert not any(n.startswith("motorcycle") for names in near for n in names)  # never called duplicates
    assert ("similar", {"motorcycle-left", "motorcycle-right"}) in groups
    assert not any("hubble" in n for _, names in groups for n in names)
    assert report.counts()["exact"] == 1 and report.unreadable == []


def test_rotated_copies_need_the_transforms(index_path):
    with Index.open(index_path) as index:
        ids = {Path(r.path).stem: r.id for r in index.records.values()}
        rotated = {ids["astronaut"], ids["astronaut-rot90"]}
        with_t = find_duplicates(index, candidate=0.75)
        without = find_duplicates(index, transforms=(), candidate=0.75)
    pair = next(p for p in with_t.pairs if {p["a"], p["b"]} == rotated)
    assert pair["kind"] == "near" and pair["score"] > 0.9 > pair["identity"] + 0.2  # not rotation invariant
    assert not any({p["a"], p["b"]} == rotated and p["kind"] == "near" for p in without.pairs)
    near = [set(g["ids"]) for g in without.groups if g["kind"] == "near"]
    assert {ids["rocket"], ids["rocket-mirror"]} in near  # mirrored photos stay close without the transforms


def test_pixel_signatures_match_edited_copies_not_shifted_views():
    from skimage import data

    photo = Image.fromarray(data.coffee())
    left, right, _ = data.stereo_motorcycle()
    sig = lambda img: pixel_signature(img)[None]
    for how in ("jpeg30", "rot90", "mirror", "half", "crop90"):
        assert pixel_scores(sig(photo), sig(_edit(photo, how)[0]))[0] > 0.9, how
    assert pixel_scores(sig(photo.transpose(Image.ROTATE_270)), sig(photo))[0] > 0.99  # all 8 transforms
    assert pixel_scores(sig(Image.fromarray(left)), sig(Image.fromarray(right)))[0] < 0.9


def test_cli_json_html_and_errors(index_path, folder, tmp_path):
    fg = fg_in_process  # the same command-line code without an interpreter start

    proc = fg("duplicates", "--index", index_path, "--json", "--html", tmp_path / "new" / "dir" / "dups.html")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["counts"]["exact"] == 1 and body["counts"]["near"] >= len(EDITED)
    assert {"a", "b", "kind", "score", "identity", "pixel"} <= set(body["pairs"][0])
    assert body["thresholds"]["near"] > 0 and body["transforms"] == ["rot90", "rot180", "flip"]
    page = (tmp_path / "new" / "dir" / "dups.html").read_text()
    assert page.count("<section class='near'>") == body["counts"]["near"]
    assert page.count("data:image/jpeg;base64,") == sum(len(g["ids"]) for g in body["groups"])
    proc = fg("duplicates", "--index", index_path, "--near", "2")
    assert proc.returncode == 2 and "between -1 and 1" in " ".join(proc.stderr.split())
    proc = fg("duplicates", "--index", index_path, "--transforms", "rot45")
    assert proc.returncode == 2 and "unknown transform" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_files_and_html_escaping(tmp_path, photos_dir):
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(photos_dir / "coffee.jpg", folder / "a<b>.jpg")
    shutil.copy(photos_dir / "coffee.jpg", folder / "copy.jpg")
    with Index.create(tmp_path / "i") as index:
        index.add([folder])
        (folder / "copy.jpg").unlink()  # indexed, then deleted: compared by hash and embedding only
        report = find_duplicates(index)
        write_html(report, tmp_path / "r.html")
    assert [g["kind"] for g in report.groups] == ["exact"] and len(report.unreadable) == 1
    page = (tmp_path / "r.html").read_text()
    assert "a&lt;b&gt;.jpg" in page and "a<b>.jpg" not in page and "class='missing'" in page
    assert parse_transforms("dihedral") == ("rot90", "rot180", "flip", "flipv", "transpose", "transverse")
    assert parse_transforms("none") == ()
    np.testing.assert_array_equal(pixel_signature(Image.new("RGB", (8, 8))), np.zeros((3, 16, 16)))
