"""Small-object retrieval (MaO): proposals, descriptors, refinement, index modes, needles benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain import Index, encoders
from finegrain.objects.config import ObjectConfig
from finegrain.objects.descriptor import crop_windows, embed_query, encode_objects, gem, prepare_objects
from finegrain.objects.proposals import ProposerUnavailable, nms, propose, region_proposals
from finegrain.objects.refine import gradcam_operators, refine_descriptor, relevance_maps
from finegrain.objects.search import ObjectTable
from finegrain.store.vectors import FieldRows


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _scene(seed: int, square: tuple[int, int, int] | None = (60, 90, 60), size: int = 320,
           patch: np.ndarray | None = None) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """A noisy two-tone background with one pasted object (a red square or ``patch``)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.float32)
    arr[:, : size // 2] = (70, 110, 160)
    arr[:, size // 2:] = (120, 150, 90)
    arr += rng.normal(0, 6, arr.shape)
    box = None
    if square is not None:
        x, y, side = square
        if patch is None:
            arr[y:y + side, x:x + side] = (230, 30, 30)
        else:
            arr[y:y + side, x:x + side] = np.asarray(Image.fromarray(patch).resize((side, side)), np.float32)
        box = (x, y, x + side, y + side)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), box


@pytest.fixture(scope="module")
def enc():
    return encoders.create("effnet-minilm")


# ---------------------------------------------------------------- proposals
def test_region_proposals_find_a_pasted_square_and_keep_the_whole_image():
    img, box = _scene(0)
    props = region_proposals(img, max_objects=8)
    assert 2 <= len(props) <= 9
    np.testing.assert_allclose(props.boxes[0], [0, 0, 320, 320])
    assert props.scores[0] == 1.0 and props.masks is not None and props.masks[0].all()
    assert max(iou(box, b) for b in props.boxes[1:]) > 0.7
    nb = props.normalized_boxes()
    assert nb.min() >= 0 and nb.max() <= 1


def test_region_proposals_largest_first_order_for_the_order_experiment():
    img, _ = _scene(0)
    props = region_proposals(img, max_objects=8, order="largest")
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in props.boxes[1:]]  # after the whole image
    assert len(areas) >= 2 and areas == sorted(areas, reverse=True)
    with pytest.raises(ValueError, match="order"):
        region_proposals(img, order="random")


def test_proposals_cap_and_plain_image():
    img, _ = _scene(1, square=None)
    assert len(region_proposals(img, max_objects=0)) == 1  # only the whole image
    noisy = Image.fromarray(np.random.default_rng(2).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    props = propose(noisy, ObjectConfig(max_objects=3))
    assert 1 <= len(props) <= 4 and props.width == 300 and props.height == 200


def test_config_validation_errors():
    with pytest.raises(ValueError, match="proposals"):
        ObjectConfig(proposals="owlv2")
    with pytest.raises(ValueError, match="space"):
        ObjectConfig(space="pixels")
    with pytest.raises(ValueError, match="crop_size"):
        ObjectConfig(crop_size=8)
    with pytest.raises(ValueError, match="unknown object settings"):
        ObjectConfig.from_dict({"proposals": "regions", "typo": 1})
    assert ObjectConfig.from_dict(ObjectConfig(refine_iters=5).to_dict()).refine


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keep = nms(boxes, np.array([0.5, 0.9, 0.3], np.float32), 0.5)
    assert keep.tolist() == [1, 2]


def test_yolox_proposer():
    pytest.importorskip("onnxruntime", reason="yolox extra not installed (pip install 'finegrain[yolox]')")
    from finegrain.objects.proposals import yolox_detector, yolox_model_path

    try:
        yolox_model_path()
    except ProposerUnavailable as exc:
        pytest.skip(f"YOLOX model not available: {exc}")
    from skimage import data

    img = Image.fromarray(data.chelsea())  # a cat: COCO class 15
    boxes, scores = yolox_detector().detect(img)
    assert boxes.shape == (3549, 4) and scores.min() >= 0 and scores.max() <= 1
    props = propose(img, ObjectConfig(proposals="yolox", threshold=0.2))
    assert len(props) >= 2 and props.masks is None
    # The cat fills most of the photo: the best detection covers a large part of it.
    best = props.boxes[1]
    assert (best[2] - best[0]) * (best[3] - best[1]) > 0.2 * img.width * img.height
    assert len(propose(img, ObjectConfig(proposals="yolox", threshold=1.0))) == 1


def test_missing_yolox_model_is_a_clear_error(monkeypatch):
    import importlib.util

    from finegrain.objects import proposals

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ProposerUnavailable, match=r"finegrain\[yolox\]"):
        proposals.yolox_model_path()


# --------------------------------------------------------------- descriptors
def test_crop_windows_are_square_centred_and_respect_min_side():
    win = crop_windows(np.array([[10, 20, 30, 60]]), pad=0.1, min_crop=0)[0]
    assert win[2] - win[0] == pytest.approx(48) and win[3] - win[1] == pytest.approx(48)
    assert (win[0] + win[2]) / 2 == pytest.approx(20) and (win[1] + win[3]) / 2 == pytest.approx(40)
    win = crop_windows(np.array([[10, 20, 30, 60]]), pad=0.1, min_crop=224)[0]
    assert win[2] - win[0] == pytest.approx(224)


def test_object_descriptor_matches_the_pasted_object_better_than_the_whole_image(enc):
    from skimage import data

    patch = data.astronaut()[30:230, 150:350]
    cfg = ObjectConfig(max_objects=8)
    img, box = _scene(3, square=(40, 200, 70), patch=patch)
    items = [prepare_objects(img, enc, cfg)]
    assert items[0].pixels.shape[1:] == (3, cfg.crop_size, cfg.crop_size) and items[0].masks.shape[0] == len(items[0].pixels)
    [vec] = encode_objects(enc, items, cfg)
    assert vec.vectors.shape == (len(items[0].pixels), 1280) and vec.refined is None
    np.testing.assert_allclose(np.linalg.norm(vec.vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vec.mean), 1, atol=1e-5)
    q = embed_query(enc, Image.fromarray(patch), cfg)
    sims = vec.vectors @ q
    assert sims[1:].max() > sims[0] + 0.05  # an object crop beats the whole image


def test_fuse_is_the_average_at_p1_and_tends_to_the_max():
    from finegrain.objects.descriptor import fuse

    v = np.array([[1.0, 0.0, 0.2], [0.0, 0.5, 0.2]], np.float32)
    avg = v.mean(0) / np.linalg.norm(v.mean(0))
    np.testing.assert_allclose(fuse(v, 1.0), avg, atol=1e-6)
    mx = v.max(0) / np.linalg.norm(v.max(0))
    np.testing.assert_allclose(fuse(v, 40.0), mx, atol=0.03)
    assert np.linalg.norm(fuse(v, 5.0)) == pytest.approx(1.0)


# ---------------------------------------------------------------- refinement
def test_closed_form_gradcam_equals_autograd_gradcam():
    torch.manual_seed(0)
    fmap = torch.rand(2, 16, 4, 4) + 0.1
    v = torch.randn(16)
    ops = gradcam_operators(fmap)
    for k in range(2):
        f = fmap[k:k + 1].clone().requires_grad_(True)
        (gem(f)[0] @ v).backward()
        weights = f.grad[0].mean(dim=(-2, -1))  # Grad-CAM: gradient averaged over the grid
        cam = torch.relu((weights[:, None, None] * fmap[k]).sum(0)).reshape(-1)
        expected = cam / (cam.max() + 1e-8)
        torch.testing.assert_close(relevance_maps(v, ops[k:k + 1])[0], expected, atol=1e-5, rtol=1e-4)


def test_refinement_moves_attention_onto_the_masks():
    torch.manual_seed(1)
    c, n = 32, 4
    fmaps = torch.rand(n, c, 4, 4) * 0.2 + 0.01
    masks = np.zeros((n, 32, 32), np.float32)
    masks[0] = 1
    for i in range(1, n):  # object i lives in the left half, where channel i fires
        fmaps[i, i, :, :2] += 2.0
        masks[i, :, :16] = 1
    vectors = torch.nn.functional.normalize(gem(fmaps), dim=1).numpy()
    initial = vectors.mean(0) / np.linalg.norm(vectors.mean(0))
    cfg = ObjectConfig(refine_iters=60, lr=0.05, alpha=0.03)
    refined = refine_descriptor(initial, vectors, fmaps, masks, cfg)
    assert refined.shape == (c,) and np.linalg.norm(refined) == pytest.approx(1, abs=1e-5)
    from finegrain.objects.refine import refinement_gain

    before, after = refinement_gain(initial, refined, fmaps, masks, n - 1)
    assert after > before + 0.05
    assert np.array_equal(refine_descriptor(initial, vectors, fmaps, masks, ObjectConfig()), initial)


def _one_hot_scene():
    """Crop 0 the whole image, crops 1 and 2 objects whose only firing channel (1, 2) covers exactly their mask.

    Grad-CAM of any descriptor with positive weight on channel i is then the
    mask of object i itself (IoU 1, up to the 1e-6 clamp of the feature map).
    """
    c = 3
    fmaps = torch.zeros(3, c, 4, 4)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[0] = 1
    fmaps[0, 0] = 1.0
    fmaps[1, 1, :, :2] = 1.0
    masks[1, :, :16] = 1
    fmaps[2, 2, :2, :] = 1.0
    masks[2, :16, :] = 1
    vectors = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.6], [0.0, 0.6, 0.8]], np.float32)
    return vectors, fmaps, masks


def test_stage_b_objective_terms_paper_and_finegrain():
    from finegrain.objects.refine import object_grid, stage_b_objective

    vectors, fmaps, masks = _one_hot_scene()
    ops, grid = gradcam_operators(fmaps[1:3]), object_grid(masks, 2, fmaps.shape[-2:])
    # Fires channel 2 only; its negative channel-0 weight outweighs the clamped (1e-6) channels elsewhere, so
    # object 2's map is exactly its mask (IoU 1) and object 1's map is all zero (IoU 0).
    v = torch.tensor([-0.8, 0.0, 0.6])
    crops = torch.from_numpy(vectors)
    paper = stage_b_objective(v, crops, ops, grid, ObjectConfig(refine_variant="paper"))
    torch.testing.assert_close(paper["iou"], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    # Paper: IoU summed over objects; anchor = v . (v_1 + v_2) = 0.6 * (0.6 + 0.8) = 0.84 (no whole image).
    assert float(paper["iou_term"]) == pytest.approx(1.0, abs=1e-6)
    assert float(paper["anchor"]) == pytest.approx(0.84, abs=1e-6)
    assert float(paper["objective"]) == pytest.approx(1.0 + 0.03 * 0.84, abs=1e-6)
    # finegrain: IoU averaged; anchor = v . (v_0 + v_1 + v_2) = -0.8 + 0.84 = 0.04.
    ours = stage_b_objective(v, crops, ops, grid, ObjectConfig(alpha=0.5))
    assert float(ours["iou_term"]) == pytest.approx(0.5, abs=1e-6)
    assert float(ours["anchor"]) == pytest.approx(0.04, abs=1e-6)
    assert float(ours["objective"]) == pytest.approx(0.5 + 0.5 * 0.04, abs=1e-6)
    v_both = torch.nn.functional.normalize(torch.tensor([0.0, 1.0, 1.0]), dim=0)  # both objects' maps on their masks
    assert float(stage_b_objective(v_both, crops, ops, grid, ObjectConfig(refine_variant="paper"))["iou_term"]) \
        == pytest.approx(2.0, abs=1e-4)


def test_stage_b_paper_variant_config_and_start():
    paper = ObjectConfig(refine_variant="paper", refine_iters=80)
    assert (paper.alpha, paper.lr, paper.step_size) == (0.03, 0.1, 0.1)
    assert (ObjectConfig().lr, ObjectConfig(refine_variant="paper", lr=0.01).lr) == (1e-3, 0.01)
    assert ObjectConfig.from_dict(paper.to_dict()) == paper and paper.to_dict()["refine_variant"] == "paper"
    # The default variant is not written, so settings stored before the option read the same.
    assert "refine_variant" not in ObjectConfig().to_dict() and ObjectConfig().to_dict()["lr"] == 1e-3
    with pytest.raises(ValueError, match="refine_variant"):
        ObjectConfig(refine_variant="maskinversion")
    # Start: a negligible step leaves the start in place: the object crops' plain average (paper), the given
    # descriptor (finegrain).
    vectors, fmaps, masks = _one_hot_scene()
    initial = np.array([1.0, 0.0, 0.0], np.float32)
    tiny = {"refine_iters": 1, "lr": 1e-9}
    start = vectors[1:].mean(0) / np.linalg.norm(vectors[1:].mean(0))
    np.testing.assert_allclose(refine_descriptor(initial, vectors, fmaps, masks,
                                                 ObjectConfig(refine_variant="paper", **tiny)), start, atol=1e-6)
    np.testing.assert_allclose(refine_descriptor(initial, vectors, fmaps, masks, ObjectConfig(**tiny)), initial,
                               atol=1e-6)


def test_stage_b_paper_variant_raises_the_summed_iou():
    from finegrain.objects.refine import refinement_gain, stage_b_start

    torch.manual_seed(1)
    c, n = 32, 4
    fmaps = torch.rand(n, c, 4, 4) * 0.2 + 0.01
    masks = np.zeros((n, 32, 32), np.float32)
    masks[0] = 1
    for i in range(1, n):  # object i lives in the left half, where channel i fires
        fmaps[i, i, :, :2] += 2.0
        masks[i, :, :16] = 1
    vectors = torch.nn.functional.normalize(gem(fmaps), dim=1).numpy()
    cfg = ObjectConfig(refine_variant="paper", refine_iters=60)  # the paper's alpha 0.03 and step 0.1
    start = stage_b_start(vectors[0], vectors, n - 1, cfg)
    np.testing.assert_allclose(start, vectors[1:].mean(0), atol=1e-7)
    refined = refine_descriptor(vectors[0], vectors, fmaps, masks, cfg)
    before, after = refinement_gain(start / np.linalg.norm(start), refined, fmaps, masks, n - 1)
    assert after > before + 0.05, (before, after)


# ------------------------------------------------------------------- search
def test_object_table_max_matches_brute_force():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(11, 5)).astype(np.float32)
    owners = np.array([7, 3, 7, 9, 3, 3, 7, 9, 9, 9, 3])
    table = ObjectTable(FieldRows(vecs, owners, {"box": rng.random((11, 4)).astype(np.float32)}),
                        np.array([9, 3, 7, 5]))
    q = rng.normal(size=5).astype(np.float32)
    best, arg = table.max_scores(q)
    for pos, image_id in enumerate([9, 3, 7]):
        assert best[pos] == pytest.approx((vecs[owners == image_id] @ q).max())
        assert table.vectors[arg[pos]] @ q == pytest.approx(best[pos])
    assert best[3] == -np.inf and arg[3] == -1  # image 5 has no objects
    assert len(table.boxes_of(1)) == 4


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> tuple[Path, Path]:
    """Six scenes (two with the astronaut's face pasted small) and the face as a query."""
    from skimage import data

    root = tmp_path_factory.mktemp("needles")
    (root / "scenes").mkdir()
    (root / "queries").mkdir()
    face = data.astronaut()[30:230, 150:350]
    Image.fromarray(face).save(root / "queries" / "face.jpg", quality=92)
    scenes = []
    for i in range(6):
        spot = (40 + 30 * i, 60 + 20 * i, 64) if i in (1, 4) else None
        img, box = _scene(10 + i, square=spot, patch=face if spot else None)
        img.save(root / "scenes" / f"s{i}.jpg", quality=92)
        scenes.append({"image": f"s{i}.jpg", "landmark": "face" if spot else None, "box": list(box) if box else None,
                       "area_fraction": (64 * 64) / 320**2 if spot else 0.0})
    gnd = {"scenes": scenes, "queries": [{"query": "face.jpg", "landmark": "face", "relevant": ["s1.jpg", "s4.jpg"]}]}
    (root / "gnd.json").write_text(json.dumps(gnd))
    return root, root / "queries" / "face.jpg"


def test_object_index_end_to_end(tmp_path, scene_dir):
    root, query = scene_dir
    cfg = ObjectConfig(max_objects=6, refine_iters=5)
    index = Index.create(tmp_path / "idx", objects=cfg)
    report = index.add([root / "scenes"])
    assert report.indexed == 6
    index.close()
    index = Index.open(tmp_path / "idx")  # re-opened from disk
    assert index.object_config == cfg and index.info()["objects"]["refine_iters"] == 5
    assert len(index.fields["objects_mean"]) == 6 and len(index.fields["objects_refined"]) == 6
    assert index.fields["objects_mean"].vectors.shape[1] == 1280
    assert 6 < len(index.fields["objects"]) <= 6 * 7
    for mode in ("objects", "objects-max", "objects-refined", "global"):
        hits = index.search(image=query, k=6, mode=mode)
        assert len(hits) == 6 and [h.rank for h in hits] == list(range(6))
        assert all(hits[i].score >= hits[i + 1].score for i in range(5))
    top2 = {Path(h.path).name for h in index.search(image=query, k=2, mode="objects-max")}
    assert top2 == {"s1.jpg", "s4.jpg"}
    some_id = index.search(image=query, k=1, mode="objects-max")[0].id
    boxes = index.object_boxes(some_id)
    np.testing.assert_allclose(boxes[0], [0, 0, 1, 1])
    from finegrain.objects.search import explain_match
    from finegrain.retrieval import Query
    from finegrain.retrieval.objects import embed_object_query

    why = explain_match(index.snapshot, some_id, embed_object_query(index.snapshot, Query(image=query)))
    assert why["score"] == pytest.approx(index.search(image=query, k=1, mode="objects-max")[0].score, abs=1e-5)
    x0, y0, x1, y1 = why["box"]
    truth = {"s1.jpg": (70, 80, 134, 144), "s4.jpg": (160, 140, 224, 204)}[Path(index.get(some_id).path).name]
    assert iou((x0, y0, x1, y1), truth) > 0.3  # the overlay points at the pasted face
    # Bad input errors.
    with pytest.raises(ValueError, match="example image"):
        index.search(text="a face", mode="objects")
    with pytest.raises(ValueError, match="exactly one"):
        index.search(mode="objects")
    with pytest.raises(ValueError, match="unknown search mode"):
        index.search(image=query, mode="objects-min")
    # Removal and compaction keep the object fields consistent.
    index.remove([some_id])
    index.compact()
    assert len(index.fields["objects_mean"]) == 5
    assert all(h.id != some_id for h in index.search(image=query, k=5, mode="objects-max"))
    index.close()


def test_object_modes_need_an_object_index(tmp_path, scene_dir):
    root, query = scene_dir
    index = Index.create(tmp_path / "plain")
    index.add([root / "scenes" / "s0.jpg"])
    with pytest.raises(ValueError, match="--objects regions"):
        index.search(image=query, mode="objects")
    index.close()
    index = Index.create(tmp_path / "norefine", objects="regions")
    index.add([root / "scenes" / "s0.jpg"])
    with pytest.raises(ValueError, match="refine-iters"):
        index.search(image=query, mode="objects-refined")
    index.close()


def test_bench_needles_on_a_tiny_set(tmp_path, scene_dir):
    from typer.testing import CliRunner

    from finegrain.bench.needles import average_precision, load_needles, needles_map, run_needles
    from finegrain.cli import app

    assert average_precision(["a", "b", "c"], {"a", "c"}) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(["x", "a", "c"], {"a"}, ignore={"x"}) == 1.0
    root, _ = scene_dir
    data = load_needles(root)
    m = needles_map([["s1.jpg", "s0.jpg", "s4.jpg"]], data)
    assert m["map"] == pytest.approx((1 + 2 / 3) / 2)
    result = run_needles(root, mode="objects-max", cache_dir=tmp_path / "cache", show_progress=False)
    assert set(result) >= {"map", "map_by_area", "index_images_per_s"} and result["map"] == pytest.approx(1.0)
    assert set(result["map_by_area"]) == {"1-2%", "2-3%", "3-4%"}
    again = run_needles(root, mode="objects-max", cache_dir=tmp_path / "cache", show_progress=False)
    assert again["index_reused"] and again["map"] == result["map"]
    other = run_needles(root, mode="objects", cache_dir=tmp_path / "cache", show_progress=False, threshold=0.05)
    assert not other["index_reused"] and other["objects"]["threshold"] == 0.05  # its own bench index
    out = CliRunner().invoke(app, ["bench", "needles", "--data", str(root), "--mode", "global-raw",
                                   "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert out.exit_code == 0, out.output
    assert 0 <= json.loads(out.output.strip().splitlines()[-1])["map"] <= 1
    bad = CliRunner().invoke(app, ["bench", "needles", "--data", str(tmp_path / "nowhere"), "--json"])
    assert bad.exit_code == 2 and "gnd.json" in bad.output


def test_cli_index_and_search_with_objects(tmp_path, scene_dir):
    from typer.testing import CliRunner

    from finegrain.cli import app

    root, query = scene_dir
    runner = CliRunner()
    bad = runner.invoke(app, ["index", str(root / "scenes"), "--index", str(tmp_path / "bad"), "--objects", "yolox",
                              "--object-threshold", "1.5"])
    assert bad.exit_code != 0 and "threshold must be between 0 and 1" in bad.output
    out = runner.invoke(app, ["index", str(root / "scenes"), "--index", str(tmp_path / "i"), "--objects", "regions",
                              "--object-threshold", "0.05", "--json"])
    assert out.exit_code == 0, out.output
    assert Index.open(tmp_path / "i").object_config.threshold == 0.05  # saved with the index
    out = runner.invoke(app, ["search", "--index", str(tmp_path / "i"), "--image", str(query), "--mode", "objects-max",
                              "-k", "3", "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["results"]) == 3
    out = runner.invoke(app, ["search", "--index", str(tmp_path / "i"), "--text", "a face", "--mode", "objects"])
    assert out.exit_code == 2 and "example image" in out.output


def test_cli_index_with_the_paper_stage_b(tmp_path, scene_dir):
    from typer.testing import CliRunner

    from finegrain.cli import app

    root, query = scene_dir
    runner = CliRunner()
    bad = runner.invoke(app, ["index", str(root / "scenes"), "--index", str(tmp_path / "bad"), "--objects", "regions",
                              "--refine-iters", "2", "--refine-variant", "legrad"])
    assert bad.exit_code != 0 and "refine-variant must be one of" in bad.output
    out = runner.invoke(app, ["index", str(root / "scenes"), "--index", str(tmp_path / "p"), "--objects", "regions",
                              "--refine-iters", "2", "--refine-variant", "paper", "--json"])
    assert out.exit_code == 0, out.output
    index = Index.open(tmp_path / "p")
    cfg = index.object_config
    assert (cfg.refine_variant, cfg.lr, cfg.alpha, cfg.refine_iters) == ("paper", 0.1, 0.03, 2)  # saved with the index
    assert len(index.fields["objects_refined"]) == 6
    assert len(index.search(image=query, mode="objects-refined", k=3)) == 3
