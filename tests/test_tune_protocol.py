"""finegrain tune chooses on data that is not reported (issue 17): --tune-on another index, --query-images."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from finegrain import Index
from finegrain.cli import app
from finegrain.decompose.segments import SegmentConfig
from finegrain.search import multivector as mv
from finegrain.tune import load_names, restrict_queries

runner = CliRunner()


def test_restrict_queries_keeps_only_listed_answers(tmp_path):
    (tmp_path / "list.txt").write_text("images/a.jpg\n\nb.jpg\n")
    names = load_names(tmp_path / "list.txt")
    assert names == {"a.jpg", "b.jpg"}
    queries = [("x", {"a.jpg"}), ("y", {"c.jpg"}), ("z", {"a.jpg", "c.jpg"}), ("w", {"b.jpg"})]
    assert restrict_queries(queries, names) == [("x", {"a.jpg"}), ("w", {"b.jpg"})]
    with pytest.raises(ValueError, match="no query"):
        restrict_queries(queries, {"d.jpg"})
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no images"):
        load_names(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def split_indexes(tmp_path_factory, tiny_flickr):
    """Segmented indexes of the tiny set's train images and of its dev images (same encoder and levels)."""
    root = tmp_path_factory.mktemp("tunesplits")
    paths = {}
    for split in ("train", "dev"):
        names = (tiny_flickr / "splits" / f"{split}.txt").read_text().split()
        index = Index.create(root / split, segments=SegmentConfig(levels=(1, 4)))
        index.add([tiny_flickr / "images" / n for n in names])
        assert len(index) == len(names)
        index.close()
        paths[split] = root / split
    return paths


def test_cli_tune_on_train_saves_into_dev(split_indexes, tiny_flickr, tmp_path):
    train, dev = split_indexes["train"], split_indexes["dev"]
    res = runner.invoke(app, ["tune", "--index", str(dev), "--tune-on", str(train), "--queries",
                              str(tiny_flickr / "captions.tsv"), "--query-images",
                              str(tiny_flickr / "splits" / "train.txt"), "--sample", "12",
                              "--plot", str(tmp_path / "tune.png"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["queries"] == 12
    assert result["chosen_on"] == {"index": str(train.resolve()), "images": 18, "queries": 12,
                                   "query_source": "captions.tsv (answers in train.txt)"}
    saved = Index.open(dev).search_config_dict()  # the reported index holds the choice and what made it
    assert mv.MultiVectorConfig.from_dict(saved["multivector"]) == mv.MultiVectorConfig.from_dict(result["chosen"])
    assert saved["tuned"]["chosen_on"]["index"] == str(train.resolve())
    assert "multivector" not in Index.open(train).search_config_dict()  # the chooser is left as it was


def test_cli_tune_protocol_errors(split_indexes, tiny_flickr, tmp_path, photos_dir):
    train, dev = split_indexes["train"], split_indexes["dev"]
    captions = str(tiny_flickr / "captions.tsv")
    # Dev answers are not in the train index: nothing to choose with (no silent fallback to dev data).
    res = runner.invoke(app, ["tune", "--index", str(dev), "--tune-on", str(train), "--queries", captions,
                              "--query-images", str(tiny_flickr / "splits" / "dev.txt")])
    assert res.exit_code == 2 and "relevant images are in the index" in " ".join(res.output.split())
    other = Index.create(tmp_path / "other", segments=SegmentConfig(levels=(1, 9)))
    other.add([sorted(photos_dir.iterdir())[0]])
    other.close()
    res = runner.invoke(app, ["tune", "--index", str(tmp_path / "other"), "--tune-on", str(train),
                              "--queries", captions])
    assert res.exit_code == 2 and "differ in segments" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert "multivector" not in Index.open(tmp_path / "other").search_config_dict()


@pytest.mark.parametrize("extra,says", [(["--sample", "0"], "sample must be a positive number"),
                                        (["--sample", "-5"], "sample must be a positive number"),
                                        (["--latency-budget-ms", "0"], "latency budget must be a positive"),
                                        (["--latency-budget-ms", "-1"], "latency budget must be a positive")])
@pytest.mark.parametrize("how", [[], ["--candidates-only"], ["--breadth-only"]])
def test_cli_tune_refuses_a_run_that_could_choose_nothing(split_indexes, tiny_flickr, extra, says, how):
    train = split_indexes["train"]
    before = Index.open(train).search_config_dict()
    res = runner.invoke(app, ["tune", "--index", str(train), "--queries", str(tiny_flickr / "captions.tsv"),
                              *how, *extra])
    assert res.exit_code == 2 and says in " ".join(res.output.split()) and "Traceback" not in res.output, res.output
    assert Index.open(train).search_config_dict() == before  # nothing saved
