"""The ``finegrain`` command line (typer). Every command has ``--help``."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="finegrain: fine-grained image retrieval over an on-disk index.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks on real data sets (tables, or JSON with --json).")
app.add_typer(bench_app, name="bench")
out = Console()
err = Console(stderr=True)


def _stderr_line(label: str, style: str, message: str) -> None:
    """``label message`` as one line on stderr: control characters escaped (messages quote file names), and
    soft-wrapped, so logs and pipes get one line (the terminal wraps it for the eye)."""
    from rich.text import Text

    from .terminal import escape_controls

    err.print(Text.assemble((label, style), " ", escape_controls(message)), soft_wrap=True)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Python warnings as one line on stderr: what happened, not the source line that raised it."""
    _stderr_line("warning:", "yellow", str(message))


@app.callback()
def _cli_setup() -> None:
    warnings.showwarning = _one_line_warning


def _fail(message: str, code: int = 1) -> None:
    _stderr_line("error:", "red", message)
    raise typer.Exit(code)


def _write_error(exc: BaseException, index: Path) -> str:
    """One line for a failure while writing to ``index`` (disk full, damaged catalog, I/O error)."""
    import errno

    def nearly_full() -> bool:  # numpy reports a short write ("1536 requested and 992 written") without errno
        try:
            st = os.statvfs(index)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 2**20

    if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and nearly_full())):
        return (f"no space left on the device of {index} (writing vector files); the index keeps its last "
                "committed state: free some space and run the command again")
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return (f"no space left on the device of {index} (committing the catalog); the index keeps its last "
                "committed state: free some space and run the command again")
    if isinstance(exc, sqlite3.IntegrityError):
        return (f"the index at {index} is damaged: its catalog contradicts itself ({exc}); rebuild the index "
                "or restore a copy")
    if isinstance(exc, sqlite3.DatabaseError):
        return f"the index at {index} is damaged or unreadable: {exc}"
    if isinstance(exc, OSError):
        return f"cannot write to the index at {index}: {exc.strerror or exc}"
    return str(exc)


@contextmanager
def _writing(index: Path, usage: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """One-line errors for a write to ``index``: locked or failed (exit 1), or one of ``usage`` (exit 2)."""
    from .index import IndexLockedError

    try:
        yield
    except IndexLockedError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    except usage as exc:
        _fail(str(exc), 2)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _local_config(local: Optional[str], scales: Optional[str], features: Optional[int], image_size: Optional[int]):
    """A LocalConfig from the --local* options (None without --local)."""
    if local is None:
        return None
    from .local.store import LocalConfig

    params: dict = {}
    if scales is not None:
        try:
            params["scales"] = [float(v) for v in scales.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"--local-scales: expected comma-separated numbers, got {scales!r}") from None
    if features is not None:
        params["max_features"] = features
    if image_size is not None:
        params["image_size"] = image_size
    try:
        return LocalConfig(local, params)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None


def _local_search_options(shortlist, mds_dim, smacof_iter, w, knn, global_field, exact_rerank=None,
                          variant=None, pairs=None) -> dict:
    """Search options of the local-feature modes given on the command line (unset ones left out)."""
    opts = {"shortlist": shortlist, "mds_dim": mds_dim, "smacof_iter": smacof_iter, "w": w, "knn": knn,
            "global_field": global_field, "exact_rerank": exact_rerank, "variant": variant, "pairs": pairs}
    return {key: v for key, v in opts.items() if v is not None}


#: ``--pairs`` of the search and bench commands (``L2GConfig.pairs``, docs/l2g.md).
PAIRS_HELP = ("l2g: where the shortlist's pairwise similarities come from: graph (default, the paper's: each image's "
              "stored neighbour list, built on the first l2g search after a change; 43 minutes at 10,000 images of "
              "970 descriptors on 2 cores) or online (measured at query time, nothing built first, but far less "
              "accurate: class mAP 83 against 96 on landmarks, docs/l2g.md).")
#: ``--variant`` of the search and bench commands: which L2G re-ranking (``L2GConfig.variant``, docs/l2g.md).
L2G_VARIANT_HELP = ("l2g: paper (default, as published: weighted vector average, w 0.19, k 700, every known query "
                    "score) or finegrain (cosine fusion, w 0.9, k 100, the query's 10 best scores: about 5x "
                    "cheaper, less accurate); --w/--shortlist still override it.")


def _asked_objects(stored: Optional[dict], asked: dict) -> dict:
    """The objects settings an ``index`` command asks of an existing index: its stored ones with the options
    given on the command line put over them (so only those can differ)."""
    from .objects.config import ObjectConfig

    return ObjectConfig.from_dict({**(stored or {}), **asked}).to_dict()


#: ``--shortlist`` and ``--w`` of the search and bench commands (their defaults come from the L2G variant).
SHORTLIST_HELP = ("global+local, l2g: images re-ranked (L2G's k; default: the variant's, 700 for paper, 100 for "
                  "finegrain; global+local 100).")
W_HELP = "l2g: weight of the global descriptor in the fusion (default: the variant's, paper 0.19, finegrain 0.9)."


def _l2g_variant(variant: Optional[str], mode: str) -> Optional[str]:
    """Check ``--variant`` (a one-line usage error rather than a traceback or a silently ignored flag)."""
    from .rerank.mds import VARIANTS

    if variant is None:
        return None
    if variant not in VARIANTS:
        _fail(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}", 2)
    if mode != "l2g":
        _fail(f"--variant selects the L2G re-ranking: it needs --mode l2g, not {mode!r}", 2)
    return variant


LOCAL_HELP = "New index: also store local features with this extractor (cnn, sift, disk) for the global+local, local and l2g modes."
def _mode_help() -> str:
    from . import retrieval

    return "Search mode: " + "; ".join(f"{m} ({d})" for m, d in retrieval.describe().items()) + "."


MODE_HELP = _mode_help()

# Options that several commands share, declared once (typer reads the Annotated metadata).
BENCH_CACHE = Path.home() / ".cache" / "finegrain" / "bench"
IndexOpt = Annotated[Path, typer.Option("--index", help="Index folder.")]
EncoderOpt = Annotated[str, typer.Option(help="Encoder.")]
BenchCacheOpt = Annotated[Path, typer.Option("--cache-dir", help="Where bench indexes are kept (reused when content is unchanged).")]
JsonLastLineOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write an HTML report (tables and plots) here.")]
RevisitopDataOpt = Annotated[Path, typer.Option("--data", help="Folder with jpg/ (database and query images) and a gnd_*.pkl/.json.")]
GndOpt = Annotated[Optional[Path], typer.Option("--gnd", help="Ground-truth file (default: the gnd_*.pkl found in --data).")]
DistractorsOpt = Annotated[Optional[Path], typer.Option("--distractors", help="Distractor images added to the database: a folder, or a text file of image paths (one per line).")]
DistractorListOpt = Annotated[Optional[Path], typer.Option("--distractor-list", help="Only these distractors: one name per line, relative to --distractors (e.g. flickr8k/splits/dev.txt).")]
# The local family's and l2g's search settings (search, bench revisitop).
ShortlistOpt = Annotated[Optional[int], typer.Option("--shortlist", help=SHORTLIST_HELP)]
MdsDimOpt = Annotated[Optional[int], typer.Option("--mds-dim", help="l2g: MDS embedding dimension (default 16).")]
SmacofIterOpt = Annotated[Optional[int], typer.Option("--smacof-iter", help="l2g: SMACOF iterations at most (default 100).")]
WOpt = Annotated[Optional[float], typer.Option("--w", help=W_HELP)]
KnnOpt = Annotated[Optional[int], typer.Option("--knn", help="local, l2g: database neighbours per query descriptor (default 512).")]
ExactRerankOpt = Annotated[Optional[int], typer.Option("--exact-rerank", help="local, l2g: re-score the approximate top R with the exact Chamfer (verification; default 200 for local, 0 for l2g).")]
VariantOpt = Annotated[Optional[str], typer.Option("--variant", help=L2G_VARIANT_HELP)]
PairsOpt = Annotated[Optional[str], typer.Option("--pairs", help=PAIRS_HELP)]


class _SettingsMismatch(ValueError):
    """Settings given for an existing index differ from its own (a usage error: exit 2)."""


def _open_index(path: Path, shard_set_ok: bool = False, note_read_only: bool = False):
    """Open an index (or, with ``shard_set_ok``, a shard set too); a clear error instead of a traceback."""
    from .index import Index
    from .shards import is_shard_set, open_index
    from .store.catalog import IndexFormatError

    if not shard_set_ok and is_shard_set(path):  # not "no finegrain index": it is one, of another kind
        _fail(f"{path} is a shard set, and this command works on one index: run it on each of its shards "
              "(`finegrain info --index SET` lists them)", 2)
    try:
        index = open_index(path) if shard_set_ok else Index.open(path)
    except IndexFormatError as exc:
        _fail(str(exc))
    if note_read_only:
        _read_only_note(path, getattr(index, "read_only", None))
    return index


def _open_ray_set(path: Path, address: Optional[str]):
    """A shard set served by Ray actors for this command (docs/scaling.md); a clear error instead of a traceback."""
    from .shards import is_shard_set
    from .store.catalog import IndexFormatError

    if not is_shard_set(path):
        _fail(f"{path} is not a shard set; --ray searches a shard set (see `finegrain shards`)", 2)
    try:
        from .distributed import RayShardSet

        return RayShardSet(path, address=address)
    except (IndexFormatError, RuntimeError, ConnectionError) as exc:
        _fail(str(exc))


def _read_only_note(path: Path, reason: Optional[str]) -> None:
    """One line on stderr when an index could only be opened read-only (searching works, writing does not)."""
    if reason:
        from rich.text import Text

        from .terminal import escape_controls

        err.print(Text.assemble(("note:", "yellow"), " ", escape_controls(
            f"the index at {path} is open read-only ({reason}): searching works, writes are disabled")), soft_wrap=True)


@app.command("index")
def index_cmd(
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (walked recursively)."),
    index: Path = typer.Option(..., "--index", help="Index folder (created if missing)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder for a new index (see `finegrain encoders`; default effnet-minilm)."),
    ann: Optional[str] = typer.Option(None, help="Top-k structure for a new index: auto (default), flat, hnsw, ivf."),
    segments: Optional[str] = typer.Option(None, help="New index: also store SLIC segments at these granularities, e.g. 4,9,16,25,36 (enables the single/exhaustive/hierarchical modes)."),
    segment_embed: str = typer.Option("pool", help="New index with segments: 'pool' (feature map pooled per segment, fast) or 'crop' (each segment crop encoded, slow)."),
    local: Optional[str] = typer.Option(None, "--local", help=LOCAL_HELP),
    local_scales: Optional[str] = typer.Option(None, "--local-scales", help="New index with --local cnn: image scales, e.g. 1.0,0.707,0.5."),
    local_features: Optional[int] = typer.Option(None, "--local-features", help="New index with --local: local features kept per image (strongest first)."),
    local_image_size: Optional[int] = typer.Option(None, "--local-image-size", help="New index with --local: longer image side at scale 1."),
    refit_local: bool = typer.Option(False, "--refit-local", help="Refit the local-feature whitening on the whole collection and re-extract every image (after adding)."),
    objects: Optional[str] = typer.Option(None, help="New index: also store small-object descriptors from these proposals: regions or yolox (enables the objects, objects-max, objects-refined modes; docs/mao.md)."),
    refine_iters: Optional[int] = typer.Option(None, help="New index with objects: Stage B attention-map refinement steps per image (default 0: off; 80 as in the paper)."),
    refine_variant: str = typer.Option("finegrain", "--refine-variant", help="New index with objects and --refine-iters: Stage B objective, finegrain (default) or paper (MaO's: summed IoU, object-crop anchor, average start, step 0.1; docs/mao.md)."),
    object_threshold: Optional[float] = typer.Option(None, "--object-threshold", help="New index with --objects yolox: detector score threshold (default 0.2, as the paper; 0.01 finds more objects that are not COCO classes, docs/mao.md)."),
    object_crop_size: Optional[int] = typer.Option(None, "--object-crop-size", help="New index with --objects: side in pixels each object crop is encoded at (default 192, chosen on training composites; 128 indexes about 1.8x faster and finds small objects less well, docs/mao.md)."),
    object_adapter: Optional[Path] = typer.Option(None, "--object-adapter", help="New index with --objects: a Stage A adapter from `finegrain train-objects`, copied into the index and applied to every object crop and object query (default none; docs/mao.md)."),
    remove_missing: bool = typer.Option(False, "--remove-missing", help="Remove indexed files that vanished from the given folders."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    commit_every: int = typer.Option(512, "--commit-every", min=1, help="Commit (make durable, visible to searches) every N images: a killed run keeps every finished commit."),
    engine: str = typer.Option("local", help="'local' (threads in this process) or 'ray' (Ray Data batch jobs; needs finegrain[ray])."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: a Ray cluster to join (auto, ray://host:10001); default a local runtime."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any file was skipped or failed."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    into_set: bool = typer.Option(False, "--into-set", help="With --engine ray: --index is a shard set (made if missing); write new shards of it, one per Ray node (or --shard-images each), each built on its node and registered when done (docs/scaling.md)."),
    shard_images: Optional[int] = typer.Option(None, "--shard-images", min=1, help="With --into-set: images per new shard (default: one shard per node)."),
) -> None:
    """Add images to an index: new files are encoded, unchanged ones skipped, bad ones reported."""
    from .decompose.segments import SegmentConfig
    from .encoders import UnknownEncoder
    from .index import DEFAULT_ENCODER, Index, IndexLockedError, settings_differences
    from .local.features import ExtractorUnavailable
    from .objects.config import REFINE_VARIANTS
    from .objects.proposals import ProposerUnavailable
    from .shards import is_shard_set
    from .stopping import stop_on_signals
    from .store.ann import check_kind
    from .store.catalog import IndexFormatError
    from .terminal import safe_text

    if refine_variant not in REFINE_VARIANTS:
        _fail(f"--refine-variant must be one of {', '.join(REFINE_VARIANTS)}, got {refine_variant!r}", 2)
    refine = refine_iters or 0  # None: not given (an error without --objects, below); the default is off
    if refine_variant != "finegrain" and not (objects and refine > 0):  # would be silently ignored
        _fail("--refine-variant selects the Stage B refinement: it needs --objects and --refine-iters N (N > 0)", 2)
    # Options of a field that is not asked for would be silently ignored: a usage error naming what they need.
    if refine_iters is not None and not objects:
        _fail("--refine-iters sets the Stage B refinement of the object descriptors: it needs --objects regions "
              "(or yolox)", 2)
    if object_threshold is not None and not objects:
        _fail("--object-threshold sets the yolox detector's score threshold: it needs --objects yolox", 2)
    if object_crop_size is not None and not objects:
        _fail("--object-crop-size sets the object crops: it needs --objects regions (or yolox)", 2)
    if object_adapter is not None and not objects:
        _fail("--object-adapter adapts the object descriptors: it needs --objects regions (or yolox)", 2)
    for option, value in (("--local-scales", local_scales), ("--local-features", local_features),
                          ("--local-image-size", local_image_size)):
        if value is not None and local is None:
            _fail(f"{option} sets the local features: it needs --local cnn (or sift, disk)", 2)
    if local_scales is not None and local != "cnn":
        _fail(f"--local-scales sets the cnn extractor's image scales: it needs --local cnn, not --local {local}", 2)
    adapter_digest = _check_object_adapter(object_adapter, encoder, index) if object_adapter is not None else None

    if into_set and object_adapter is not None:  # the new shards would record the adapter without its copy
        _fail("--object-adapter does not work with --into-set yet: index each shard with --object-adapter instead", 2)
    if into_set and engine != "ray":
        _fail("--into-set builds shards on Ray nodes: give --engine ray (and --address for a cluster)", 2)
    # A misspelt folder would otherwise make an empty index (and, with --remove-missing, empty an existing one).
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(missing)} (nothing was indexed)", 2)
    # Every setting is checked here, by the config objects themselves, before any folder is made or written:
    # an index's fields are fixed at creation, so a bad value found later would leave an index that refuses
    # the corrected retry. Bad values and missing optional packages are usage errors (exit 2).
    try:
        if ann is not None:
            check_kind(ann)
        seg = SegmentConfig(levels=_int_list(segments), embed=segment_embed) if segments else None
        obj = None
        obj_asked: dict[str, Any] = {}
        if objects:
            from .objects.config import ObjectConfig

            extra: dict[str, Any] = {} if object_threshold is None else {"threshold": object_threshold}
            if adapter_digest is not None:
                extra["adapter"] = adapter_digest
            if object_crop_size is not None:
                extra["crop_size"] = object_crop_size
            obj = ObjectConfig(proposals=objects, refine_iters=refine, refine_variant=refine_variant, **extra)
            # What this command asks of the objects field: the options given, not the defaults of today's
            # version (an index made when the defaults differed must still take more images).
            obj_asked = {"proposals": objects, "refine_iters": refine, "refine_variant": refine_variant,
                         "lr": obj.lr, "adapter": adapter_digest, **extra}
        local_cfg = _local_config(local, local_scales, local_features, local_image_size)
        if local_cfg is not None:
            local_cfg.check_available()
        if obj is not None:
            obj.check_available()
    except typer.BadParameter as exc:
        _fail(exc.message, 2)
    except (ValueError, TypeError, ExtractorUnavailable, ProposerUnavailable) as exc:
        _fail(str(exc), 2)
    if not into_set and is_shard_set(index):  # not "exists and is not an empty folder": say what it is
        _fail(f"{index} is a shard set: add images to it with --into-set (new shards built on Ray nodes), "
              "or index into one of its shards", 2)
    try:
        if into_set:
            _index_into_set(index, inputs, address, shard_images, batch_size, commit_every, as_json, strict,
                            {"encoder": encoder or DEFAULT_ENCODER, "ann": ann or "auto", "segments": seg,
                             "objects": obj, "local": local_cfg})
            return
        if (index / "finegrain.sqlite").exists():
            idx = Index.open(index)
            # Settings given for an existing index must be its own: never silently ignored.
            asked = {key: value for key, value, given in (
                ("encoder", encoder, encoder is not None), ("ann", ann, ann is not None),
                ("segments", seg.to_dict() if seg else None, seg is not None),
                ("local", local_cfg.to_dict() if local_cfg else None, local_cfg is not None),
                ("objects", _asked_objects(idx.snapshot.settings.get("objects"), obj_asked) if obj else None,
                 obj is not None))
                if given}
            diff = settings_differences(idx.snapshot.settings, asked)
            if diff:
                raise _SettingsMismatch(f"the index at {index} was created with other settings ({'; '.join(diff)}); "
                                        "its fields are fixed at creation: index into a new folder to use these settings")
        else:
            idx = Index.create(index, encoder=encoder or DEFAULT_ENCODER, ann=ann or "auto", segments=seg,
                               objects=obj, local=local_cfg)
            if object_adapter is not None:  # the index keeps its own copy (checked against the recorded hash)
                from .objects.adapter import install

                install(index, object_adapter)
        with stop_on_signals(lambda _: err.print("stopping: committing what is encoded (again to abort now)")) as stop:
            report = idx.add(inputs, remove_missing=remove_missing, batch_size=batch_size,
                             show_progress=not as_json, engine=engine, ray_address=address,
                             commit_every=commit_every, stop=stop)
        if refit_local and not report.stopped:
            idx.refit_local(show_progress=not as_json)
    except (_SettingsMismatch, UnknownEncoder, ExtractorUnavailable, ProposerUnavailable) as exc:
        _fail(str(exc), 2)
    except (IndexFormatError, IndexLockedError, FileExistsError, KeyError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    except KeyboardInterrupt:  # a second Ctrl-C: finished commits are kept, the rest is redone next run
        _fail("interrupted: the images committed so far are kept; run the same command to continue", 130)
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        out.print(f"indexed [bold]{report.indexed}[/bold], unchanged {report.unchanged}, removed {report.removed}, "
                  f"failed {len(report.failed)} in {report.seconds:.1f}s ({report.images_per_s:.1f} images/s); "
                  f"index now holds {len(idx)} images")
        if report.failed:
            table = Table(title="skipped or failed", title_justify="left")
            table.add_column("skipped file", overflow="fold")
            table.add_column("reason")
            for path, reason in report.failed[:50]:
                table.add_row(safe_text(path), safe_text(reason))
            out.print(table)
            if len(report.failed) > 50:
                out.print(f"... and {len(report.failed) - 50} more (see `finegrain info --json`)")
    if report.failed:
        err.print(f"[yellow]warning:[/yellow] {len(report.failed)} file(s) skipped")
    if report.stopped:
        err.print("stopped before the end: run the same command to index the rest")
        raise typer.Exit(stop.exit_code())
    if report.failed and strict:
        raise typer.Exit(2)


def _check_object_adapter(path: Path, encoder: Optional[str], index: Path) -> str:
    """The SHA-256 of a valid adapter made for this index's encoder (one-line error otherwise)."""
    from .index import DEFAULT_ENCODER
    from .objects.adapter import AdapterError, file_digest, read_adapter

    try:
        _, meta = read_adapter(path)
    except AdapterError as exc:
        _fail(str(exc), 2)
    if (index / "finegrain.sqlite").exists():
        from .store.catalog import Catalog

        catalog = Catalog(index)
        try:
            encoder = encoder or catalog.get_meta("encoder")
        finally:
            catalog.close()
    wanted = meta.get("encoder")
    if wanted and wanted != (encoder or DEFAULT_ENCODER):
        _fail(f"the object adapter {path} was trained for encoder {wanted!r}, not {encoder or DEFAULT_ENCODER!r}", 2)
    return file_digest(path)


def _index_into_set(set_path: Path, inputs: list[Path], address: Optional[str], shard_images: Optional[int],
                    batch_size: int, commit_every: int, as_json: bool, strict: bool, create: dict) -> None:
    """`finegrain index --engine ray --into-set`: new shards built on the cluster's nodes, registered in the set."""
    from .distributed import index_shards
    from .shards import is_shard_set

    reports = index_shards(set_path, inputs, address=address, images_per_shard=shard_images,
                           create=None if is_shard_set(set_path) else create, batch_size=batch_size,
                           commit_every=commit_every, show_progress=not as_json)
    if as_json:
        print(json.dumps({"shards": reports}))
    lost = [r for r in reports if r.get("error")]
    failed = sum(r.get("failed", 0) + len(r.get("failures", [])) * (r.get("path") is None) for r in reports)
    if not as_json:
        for r in reports:
            if r.get("path") and not r.get("error"):
                out.print(f"shard {r['path']}: indexed {r['indexed']}, failed {r['failed']}, {r['images']} images")
    for r in lost:
        err.print(f"error: shard {r['path']} was not finished ({r['error']}); re-run the same command with "
                  f"`finegrain index FILES --index {r['path']}` and `finegrain shards --add`", markup=False)
    if lost:
        raise typer.Exit(1)
    if failed and strict:
        raise typer.Exit(2)


def _bbox(values: Optional[list[str]], extra: list[str]) -> Optional[list[float]]:
    """--bbox as four numbers: ``--bbox 40 30 200 180``, four ``--bbox`` options, or ``--bbox 40,30,200,180``.

    click gives an option one value, so the three numbers after the first one
    arrive as extra arguments (see _bbox_and_terms for the query words among them).
    """
    import math
    import re

    if extra and len(values or []) != 1:
        _fail(f"unexpected arguments: {' '.join(extra)}", 2)
    if not values:
        return None
    parts = [p for v in [*values, *extra] for p in re.split(r"[\s,]+", v.strip()) if p]
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        _fail(f"--bbox needs four finite numbers x0 y0 x1 y1, got {' '.join(parts)!r}", 2)
    return box


def _bbox_and_terms(values: Optional[list[str]], extra: list[str]) -> tuple[Optional[list[float]], list[str]]:
    """Split the extra arguments into --bbox's spilled numbers and the query expression's words.

    With ``--bbox X0 Y0 X1 Y1`` the first run of numbers among the extra
    arguments belongs to the box; every other one is a word of the expression.
    """
    def numeric(v: str) -> bool:
        try:
            float(v)
        except ValueError:
            return False
        return True

    options = [v for v in extra if v.startswith("--") or (len(v) > 1 and v[0] == "-" and v[1].isalpha())]
    if options:
        _fail(f"unexpected arguments: {' '.join(options)} (no such option)", 2)
    spilled: list[str] = []
    if values is not None and len(values) == 1 and not any(c in values[0] for c in ", \t"):
        start = next((i for i, v in enumerate(extra) if numeric(v)), len(extra))
        end = start
        while end < len(extra) and numeric(extra[end]):
            end += 1
        spilled, extra = extra[start:end], extra[:start] + extra[end:]
    return _bbox(values, spilled), extra


def _filters(path_prefix, glob, taken_after, taken_before, make, model, orientation, min_width, max_width,
             min_height, max_height, ids) -> dict:
    """The search filters given on the command line (validated by ``Filters``; None values are "not given")."""
    if path_prefix:  # paths are stored absolute; keep a trailing separator ("only inside this folder")
        path_prefix = os.path.abspath(path_prefix) + (os.sep if path_prefix.endswith(os.sep) else "")
    id_list = None
    if ids is not None:
        try:
            id_list = [int(p) for p in ids.replace(",", " ").split()]
        except ValueError:
            _fail(f"--ids must be image ids separated by commas, got {ids!r}", 2)
        if not id_list:  # most likely an unset shell variable: matching nothing would look like no results
            _fail("--ids is empty: give image ids separated by commas, or leave the filter out", 2)
    return {"path_prefix": path_prefix, "glob": glob, "taken_after": taken_after, "taken_before": taken_before,
            "make": make, "model": model, "orientation": orientation, "min_width": min_width, "max_width": max_width,
            "min_height": min_height, "max_height": max_height, "ids": id_list}


@app.command("search", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] [QUERY]...")
def search_cmd(
    ctx: typer.Context,
    index: Path = typer.Option(..., "--index", help="Index folder, or a shard set (see `finegrain shards`)."),
    text: Optional[str] = typer.Option(None, "--text", help="Describe what to find (taken literally; see QUERY for arithmetic)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Find images like this one (with --text or QUERY: one query of both)."),
    negative: Optional[list[str]] = typer.Option(None, "--not", help="Move away from this text (repeatable).", show_default=False),
    negative_image: Optional[list[Path]] = typer.Option(None, "--not-image", help="Move away from images like this one (repeatable).", show_default=False),
    bbox: Optional[list[str]] = typer.Option(None, "--bbox", help="Crop the query image: --bbox X0 Y0 X1 Y1 (or four --bbox options, or X0,Y0,X1,Y1).", show_default=False),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    mode: str = typer.Option("auto", help=MODE_HELP),
    dim: Optional[int] = typer.Option(None, "--dim", help="SS2D-compressed index: search with this nested size (leading DIM dimensions)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="single, exhaustive, hierarchical: images per query vector taken from the global top-k before segment scoring; objects-max: images taken from the objects_mean top-k plus the owners of the best object rows before object scoring (0: every image; default: the value `finegrain tune` saved for the multi-vector modes, else every image up to 20,000 and, above, 3,200 images from one fused search)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="single, exhaustive, hierarchical behind a candidate stage: 'union' (each query vector's own global top N; the default with --candidates) or 'fused' (the top N of one vector weighting the full query and its sub-queries as the score does: one search; the default without a size)."),
    rescore: Optional[int] = typer.Option(None, "--rescore", help="single, exhaustive, hierarchical on compact segments (compress --field segments), or global on a quantised global field (compress --field global; default 100, 0: off): score the best N images again from the float32 originals."),
    decomposer: Optional[str] = typer.Option(None, "--decomposer", help="single, exhaustive, hierarchical: how the text query is split into sub-queries: rules (default, or the index's saved choice) or llm:<url>#<model> (an OpenAI-compatible server; falls back to rules with a warning when it fails; docs/himir.md)."),
    breadth: Optional[int] = typer.Option(None, "--breadth", help="global on an ANN index (HNSW, IVF): how much of the structure one search explores, HNSW's efSearch (default 128) or IVF's lists probed (default lists/16); more is slower and closer to exact."),
    shortlist: ShortlistOpt = None,
    mds_dim: MdsDimOpt = None,
    smacof_iter: SmacofIterOpt = None,
    w: WOpt = None,
    knn: KnnOpt = None,
    exact_rerank: ExactRerankOpt = None,
    variant: VariantOpt = None,
    pairs: PairsOpt = None,
    global_field: Optional[str] = typer.Option(None, "--global-field", help="Global descriptor of the local modes (and of global with 'instance'): instance (multi-scale GeM) or joint."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    fmt: str = typer.Option("table", "--format", help="Output: table, jsonl (one JSON object per result) or paths (one path per line, for pipes)."),
    path_prefix: Optional[str] = typer.Option(None, "--path-prefix", help="Filter: only files whose path starts with this (a relative path is made absolute; docs/filters.md).", rich_help_panel="Filters"),
    glob: Optional[str] = typer.Option(None, "--glob", help="Filter: shell pattern, case-insensitive; matches the file name, or the whole path if it has a '/'.", rich_help_panel="Filters"),
    taken_after: Optional[str] = typer.Option(None, "--taken-after", help="Filter: captured at or after this ISO date/time (EXIF date, else file mtime), e.g. 2023-06-01.", rich_help_panel="Filters"),
    taken_before: Optional[str] = typer.Option(None, "--taken-before", help="Filter: captured before this ISO date/time (exclusive).", rich_help_panel="Filters"),
    make: Optional[str] = typer.Option(None, "--make", help="Filter: camera make contains this (case-insensitive).", rich_help_panel="Filters"),
    model: Optional[str] = typer.Option(None, "--model", help="Filter: camera model contains this (case-insensitive).", rich_help_panel="Filters"),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="Filter: landscape, portrait or square.", rich_help_panel="Filters"),
    min_width: Optional[int] = typer.Option(None, "--min-width", help="Filter: at least this many pixels wide.", rich_help_panel="Filters"),
    max_width: Optional[int] = typer.Option(None, "--max-width", help="Filter: at most this many pixels wide.", rich_help_panel="Filters"),
    min_height: Optional[int] = typer.Option(None, "--min-height", help="Filter: at least this many pixels high.", rich_help_panel="Filters"),
    max_height: Optional[int] = typer.Option(None, "--max-height", help="Filter: at most this many pixels high.", rich_help_panel="Filters"),
    ids: Optional[str] = typer.Option(None, "--ids", help="Filter: only these image ids, comma-separated.", rich_help_panel="Filters"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Drop results scoring below this.", rich_help_panel="Filters"),
    offset: int = typer.Option(0, "--offset", help="Skip this many results (pagination).", rich_help_panel="Filters"),
    sort: str = typer.Option("score", "--sort", help="score (best first), date (oldest first) or -date (newest first).", rich_help_panel="Filters"),
    like: Optional[int] = typer.Option(None, "--like", help="More like this: the id of an indexed image as the example (instead of --text, --image or QUERY)."),
    ray: bool = typer.Option(False, "--ray", help="Shard set: search it with Ray actors per shard (docs/scaling.md)."),
    ray_address: Optional[str] = typer.Option(None, "--address", help="With --ray: the cluster (auto, ray://HOST:10001); default: a local Ray runtime."),
) -> None:
    """Search an index by text, by example image, or both: [QUERY]... is an expression such as
    '"a beach" + "sunset" - "people"', 2:"red car" or @photo.jpg (docs/queries.md). The default mode, auto,
    picks the mode for the query and the index."""
    from .images import ImageLoadError
    from .retrieval.terms import build_query
    from .store.catalog import IndexFormatError
    from .terminal import safe_text

    box, tokens = _bbox_and_terms(bbox, list(ctx.args))
    if like is not None and (text is not None or image is not None or tokens):
        _fail("--like names the example image by id: give it instead of --text, --image or a query", 2)
    if text is None and image is None and not tokens and like is None:
        _fail("give exactly one of --text or --image, or a query expression", 2)
    if fmt not in ("table", "jsonl", "paths") or (as_json and fmt != "table"):
        _fail(f"--format must be table, jsonl or paths (and not given with --json), got {fmt!r}", 2)
    if global_field == "instance" and mode == "global":  # the instance descriptor is its own mode now
        mode, global_field = "instance", None
    elif global_field == "joint" and mode == "global":  # the joint space is what global searches anyway
        global_field = None
    idx: Any = None
    if like is not None:  # the indexed image's stored path is the example (as Index.search(like=) does)
        from .index import Index

        idx = _open_index(index, shard_set_ok=True, note_read_only=True)
        if not isinstance(idx, Index):
            _fail("--like takes an image id of one index, not of a shard set", 2)
        try:
            image = Path(idx.like_path(like))
        except ValueError as exc:
            _fail(str(exc), 2)
    try:
        query = build_query(text, image, box, negative, negative_image, query=" ".join(tokens) if tokens else None)
    except ValueError as exc:
        _fail(str(exc), 2)
    if idx is None:
        idx = _open_ray_set(index, ray_address) if ray else _open_index(index, shard_set_ok=True, note_read_only=True)
    options = _local_search_options(shortlist, mds_dim, smacof_iter, w, knn, global_field, exact_rerank,
                                    _l2g_variant(variant, mode), pairs)
    if dim is not None:
        options["dim"] = dim
    if candidates is not None:
        options["candidates"] = candidates
    if stage is not None:
        options["stage"] = stage
    if rescore is not None:
        options["rescore"] = rescore
    if breadth is not None:
        options["breadth"] = breadth
    if decomposer is not None:
        options["decomposer"] = decomposer
    filters = _filters(path_prefix, glob, taken_after, taken_before, make, model, orientation, min_width, max_width,
                       min_height, max_height, ids)
    try:
        response = idx.search(query=query, k=k, mode=mode, filters=filters, threshold=threshold, offset=offset,
                              sort=sort, **options)
    except ImageLoadError as exc:  # a query may hold several images: say which one
        _fail(exc.with_path(), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    except IndexFormatError as exc:  # a chunk found damaged (on first read, or recorded by `finegrain check`)
        _fail(str(exc))
    except RuntimeError as exc:  # a Ray shard set with every shard down (ShardUnavailable)
        _fail(str(exc))
    if response.partial:  # never a silent short answer
        err.print(f"warning: partial results: no answer from shard(s) {', '.join(response.partial)}",
                  markup=False, highlight=False)
    if as_json:
        print(json.dumps({"query": query.describe(), **response.as_dict()}))
        return
    if fmt != "table":
        from .formats import print_hits

        print_hits(response.hits, fmt)
        return
    if response.requested_mode:
        out.print(safe_text(f"mode: {response.mode} (picked by {response.requested_mode})"))
    if len(response.subqueries) > 1 or response.stats.levels_visited:
        out.print(safe_text(f"sub-queries: {response.subqueries[1:]}; {response.stats.sim_ops} similarity "
                            f"operations, {response.stats.levels_visited} level(s) visited"))
    table = Table("rank", "score", "id")
    if sort != "score":
        table.add_column("taken")
    table.add_column("path", overflow="fold")
    for h in response:
        dated = [h.taken or ""] if sort != "score" else []
        table.add_row(str(h.rank + 1), f"{h.score:.4f}", str(h.id), *dated, safe_text(h.path))
    if response.allowed is not None:
        out.print(f"{response.allowed} image(s) pass the filters")
    out.print(table)


@app.command("info")
def info_cmd(
    index: IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an index (or a shard set) holds: counts, encoder, size, skipped files."""
    from rich.text import Text

    from .terminal import safe_text

    info = _open_index(index, shard_set_ok=True, note_read_only=True).info()
    if as_json:
        print(json.dumps(info))
        return
    table = Table("key", "value", show_header=False)
    for key, value in info.items():
        if key not in ("failures", "per_shard"):
            table.add_row(key, Text(_cell(value)))  # a Text: never parsed for markup
    out.print(table)
    if info.get("failures"):
        ft = Table("skipped file", "reason", title="skipped or failed files", title_justify="left")
        for f in info["failures"]:
            ft.add_row(safe_text(f["path"]), safe_text(f["reason"]))
        out.print(ft)


def _cell(value: Any) -> str:
    """A table cell for a nested value: ``key value`` lines and lists joined, not a Python repr (--json has the data);
    every piece's control characters escaped."""
    from .terminal import escape_controls

    if isinstance(value, dict):
        return "\n".join(f"{escape_controls(k)} {_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "-"
    return "-" if value is None else escape_controls(value)


@app.command("export")
def export_cmd(
    index: IndexOpt,
    out_dir: Path = typer.Option(..., "--out", help="New folder for img_emb/img_emb_N.npy and metadata/metadata_N.parquet (clip-retrieval's layout)."),
    rows_per_file: int = typer.Option(1_000_000, "--rows-per-file", help="Images per .npy/.parquet pair."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Export embeddings and metadata in clip-retrieval's layout (docs/interop.md)."""
    from .interop import export_index

    idx = _open_index(index)
    try:
        info = export_index(idx, out_dir, rows_per_file=rows_per_file, show_progress=not as_json)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc), 2)
    if as_json:
        print(json.dumps(info))
    else:
        out.print(f"exported {info['images']} images ({info['dim']}-dim, encoder {info['encoder']}) to {out_dir}")


@app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="A clip-retrieval embedding folder (img_emb/, metadata/)."),
    index: Path = typer.Option(..., "--index", help="New index folder (must not exist yet)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="What computed the embeddings: a finegrain encoder (text and image search work) or any other name (vector search only). Default: the exporter's, else external."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build a new index from embeddings computed elsewhere (clip-retrieval's layout; docs/interop.md)."""
    from .interop import import_embeddings

    try:
        info = import_embeddings(src, index, encoder=encoder, show_progress=not as_json, log=err.print)
    except (FileExistsError, ValueError) as exc:  # ImportFormatError included
        _fail(str(exc), 2)
    if as_json:
        print(json.dumps(info))
    else:
        searches = "text, image and vector search" if info["text_search"] else "vector search only"
        out.print(f"imported {info['images']} images ({info['dim']}-dim, encoder {info['encoder']}: {searches}) "
                  f"into {index}")


@app.command("duplicates")
def duplicates_cmd(
    index: IndexOpt,
    near: Optional[float] = typer.Option(None, "--near", help="Pixel match (0-1) of a near-duplicate (default: calibrated, docs/duplicates.md)."),
    similar: Optional[float] = typer.Option(None, "--similar", help="Embedding cosine of 'similar' (burst-like) pairs (default: calibrated)."),
    candidate: Optional[float] = typer.Option(None, "--candidate", help="Embedding cosine a pair needs before its pixels are compared (default: calibrated)."),
    transforms: str = typer.Option("rot90,rot180,flip", "--transforms", help="Embed images also under these transforms to find rotated/mirrored copies: a comma list of rot90, rot180, flip, flipv, transpose, transverse; 'dihedral' (all) or 'none' (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print groups and pairs as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML report with thumbnails here."),
) -> None:
    """Group exact copies, near-duplicates (edited, rotated, mirrored copies) and similar shots (docs/duplicates.md)."""
    from . import duplicates as dup

    try:
        chosen = dup.parse_transforms(transforms)
    except ValueError as exc:
        _fail(str(exc), 2)
    idx = _open_index(index)
    try:
        report = dup.find_duplicates(idx, near=dup.NEAR_THRESHOLD if near is None else near,
                                     similar=dup.SIMILAR_THRESHOLD if similar is None else similar,
                                     candidate=dup.CANDIDATE_THRESHOLD if candidate is None else candidate,
                                     transforms=chosen, show_progress=not as_json)
    except ValueError as exc:  # bad thresholds; an index of imported vectors with transforms
        _fail(str(exc), 2)
    if html_out is not None:
        try:
            dup.write_html(report, html_out)
        except OSError as exc:
            _fail(f"cannot write {html_out}: {exc.strerror or exc}")
        err.print(f"report: {html_out}")
    if report.unreadable:
        err.print(f"[yellow]warning:[/yellow] {len(report.unreadable)} image file(s) could not be read: "
                  "compared by embedding only (never 'near')")
    if as_json:
        print(json.dumps(report.as_dict()))
        return
    counts = report.counts()
    out.print(f"{report.images} images: {counts['exact']} exact, {counts['near']} near and {counts['similar']} "
              "similar groups")
    table = Table("kind", "images", "score")
    table.add_column("paths", overflow="fold")
    for group in report.groups[:200]:
        paths = group["paths"]
        shown = "\n".join(paths[:4]) + (f"\n... and {len(paths) - 4} more" if len(paths) > 4 else "")
        table.add_row(group["kind"], str(len(paths)), f"{group['min_score']:.3f}-{group['max_score']:.3f}", shown)
    if report.groups:
        out.print(table)
    if len(report.groups) > 200:
        out.print(f"... and {len(report.groups) - 200} more groups (--json lists all)")


@app.command("compress")
def compress_cmd(
    index: IndexOpt,
    method: Optional[str] = typer.Option(None, "--method", help="pca, aesvc, aesvc-paper (AE-SVC with the paper's loss form and weights, docs/compress.md) or ss2d; none removes the projection (required without --field)."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Output size (SS2D: the largest nested size; smaller ones are picked with `search --dim`)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps of aesvc/ss2d (default: the class default)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="aesvc/ss2d: rows per training step (default 256; at 128 dims 1,024 measured better, docs/compress.md)."),
    teacher: str = typer.Option("aesvc", "--teacher", help="ss2d: distil an AE-SVC's similarities (aesvc, the paper) or the original embeddings' (input; better on about a thousand images, worse on 7,000: see docs/compress.md)."),
    field: Optional[str] = typer.Option(None, "--field", help="A field to store compact: segments, objects, objects_mean, objects_refined; local or instance (--quantize int8 only); global (--quantize, with --method/--dim: the global projection quantised) (default: the global projection)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="With --field: float16, int8 (per-dimension scale) or none; --method none --quantize none returns to the originals."),
    drop_originals: bool = typer.Option(False, "--drop-originals", help="With --field: delete the float32 originals (saves disk; undo then needs re-indexing)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored projection as JSON."),
) -> None:
    """Fit a compact projection on the index's own embeddings; later queries and additions use it automatically."""
    if field is not None and (field != "global" or quantize is not None or drop_originals):
        _compress_field(index, field, method, dim, quantize, drop_originals, _training(method, steps, batch_size),
                        teacher, as_json)
        return
    if quantize is not None or drop_originals:
        _fail("--quantize and --drop-originals need --field (global, local, segments, objects, objects_mean, "
              "objects_refined); without it --method and --dim project the global field", 2)
    if method is None:
        _fail("--method is required (or --field FIELD --quantize Q for a multi-vector field)", 2)
    if method != "none" and dim is None:
        _fail("--dim is required (the output size)", 2)
    idx = _open_index(index)
    from .compress.indexing import METHODS

    if method not in (*METHODS, "aesvc-paper"):
        _fail(f"unknown compression method {method!r}; choose one of pca, aesvc, aesvc-paper, ss2d, none", 2)
    params: dict[str, Any] = {}
    if method == "aesvc-paper":  # the name bench compress uses for AESVC(loss="paper")
        method, params["loss"] = "aesvc", "paper"
    params.update(_training(method, steps, batch_size))
    if teacher not in ("aesvc", "input"):
        _fail(f"--teacher must be aesvc or input, got {teacher!r}", 2)
    if method == "ss2d":
        params["teacher"] = None if teacher == "input" else "aesvc"
    with _writing(index, usage=(ValueError, TypeError)):
        info = idx.compress(method, dim, show_progress=not as_json, **params)
    if as_json:
        print(json.dumps({"projection": info or None, "bytes_per_image": idx.info()["bytes_per_image"]}))
    elif not info:
        out.print(f"projection removed; searching the original {idx.info()['dim']}-dim embeddings")
    else:
        sizes = f" (nested sizes {', '.join(map(str, info['dims']))}: `finegrain search --dim D`)" if "dims" in info else ""
        out.print(f"compressed {info['fitted_on']} images with {info['method']} from {info['input_dim']} to {info['dim']} dims "
                  f"in {info['fit_seconds']:.1f}s{sizes}; {4 * info['dim']} bytes per image searched "
                  f"(originals kept: {4 * info['input_dim']} bytes per image)")


def _training(method: Optional[str], steps: Optional[int], batch_size: Optional[int]) -> dict[str, int]:
    """The learned projections' training options that were given (PCA has none to take)."""
    if method not in ("aesvc", "aesvc-paper", "ss2d"):
        return {}
    given = {"n_steps": steps, "batch_size": batch_size}
    return {k: v for k, v in given.items() if v is not None}


def _compress_field(index: Path, field: str, method: Optional[str], dim: Optional[int], quantize: Optional[str],
                    drop_originals: bool, training: dict[str, int], teacher: str, as_json: bool) -> None:
    """`compress --field`: one multi-vector field's compact storage (compress/storage.py)."""
    from .compress import storage

    method = method or "none"
    params: dict[str, Any] = {}
    if method == "aesvc-paper":  # AESVC(loss="paper"), as without --field
        method, params["loss"] = "aesvc", "paper"
    idx = _open_index(index)
    params.update(training)
    if method == "ss2d":
        if teacher not in ("aesvc", "input"):
            _fail(f"--teacher must be aesvc or input, got {teacher!r}", 2)
        params["teacher"] = None if teacher == "input" else "aesvc"
    with _writing(index, usage=(ValueError, TypeError)):
        info = idx.compress(method, dim, show_progress=not as_json, field=field, quantize=quantize or "none",
                            drop_originals=drop_originals, **params)
    per_image = idx.info()["vector_bytes_per_image"]
    projected = field == "global" and bool(info.get("projection"))  # the global projection's rows, quantised
    stored = per_image.get(storage.compact_name("compressed" if projected else field) if info else field, 0.0)
    if as_json:
        print(json.dumps({"field": field, "storage": info or None, "bytes_per_image": stored,
                          "vector_bytes_per_image": per_image}))
    elif not info and field == "global" and idx.info()["projection"]:  # the projection stays
        kept = idx.info()["projection"]
        out.print(f"global: searching the float32 projected rows again ({kept['method']} to {kept['dim']} dims, "
                  f"{4 * kept['dim']} bytes per image)")
    elif not info:
        original = "float16" if field in ("local", "instance") else "float32"  # local features are stored float16
        out.print(f"{field}: stored as the original {original} rows again ({stored:.0f} bytes per image)")
    else:
        proj = f"{info['method']} to {info['dim']} dims, " if info["method"] != "none" else ""
        if projected:
            proj = f"projected ({info['projection']['method']} to {info['dim']} dims), "
        out.print(f"{field}: {proj}{info['quantize'] if info['quantize'] != 'none' else 'float32'} rows, "
                  f"{stored:.0f} bytes per image (originals {info['originals']}"
                  + (f"; fitted on {info['fitted_on']} rows in {info['fit_seconds']:.1f}s)" if info["fitted_on"] else ")"))


@app.command("remove")
def remove_cmd(
    index: IndexOpt,
    ids: list[int] = typer.Argument(..., help="Image ids to remove."),
) -> None:
    """Remove images from an index by id."""
    from .index import IndexLockedError

    try:
        n = _open_index(index).remove(ids)
    except KeyError as exc:
        _fail(str(exc.args[0]), 2)
    except IndexLockedError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    out.print(f"removed {n} image(s)")


@app.command("compact")
def compact_cmd(index: IndexOpt) -> None:
    """Merge vector chunks and drop removed images from disk."""
    from .index import IndexLockedError

    idx = _open_index(index)
    try:
        idx.compact()
    except IndexLockedError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    out.print(f"compacted: {idx.info()['chunks']} chunk(s), {idx.info()['bytes_on_disk']} bytes")


@app.command("prepare")
def prepare_cmd(
    index: IndexOpt,
    mode: Optional[list[str]] = typer.Option(None, "--mode", help="A search mode to prepare (repeatable; default: every mode the index supports)."),
    graph_queries: Optional[str] = typer.Option(None, "--graph-queries", help="l2g neighbour lists: what each image queries with: auto (default; every descriptor up to 10M stored, above that the strongest representatives), all, representatives. Saved in the index."),
    graph_features: Optional[int] = typer.Option(None, "--graph-features", help="l2g neighbour lists: only the strongest N of those query descriptors. Saved in the index."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: per mode, what is ready."),
) -> None:
    """Build the search structures now (FAISS indexes, the l2g neighbour lists) instead of on the first search.

    They are cached in the index per state, so this only pays where something changed. The l2g neighbour
    lists take hours at 10^5 images; a stopped build resumes where it was.
    """
    from .index import IndexLockedError

    idx = _open_index(index)
    try:
        ready = idx.prepare(mode or None, show_progress=not as_json, graph_queries=graph_queries,
                            graph_features=graph_features)
    except ValueError as exc:
        _fail(str(exc), 2)
    except IndexLockedError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    if as_json:
        print(json.dumps(ready))
        return
    for name, built in ready.items():
        out.print(f"{name}: " + ("; ".join(built) if built else "nothing to build (searches read the index as stored)"))


@app.command("shards")
def shards_cmd(
    members: list[Path] = typer.Argument(..., help="Existing index folders, one per shard."),
    out_path: Path = typer.Option(..., "--out", help="Folder for the shard-set manifest (shards.json)."),
    add: bool = typer.Option(False, "--add", help="Append the indexes to the existing set at --out (a service serving it picks them up on its next reload)."),
) -> None:
    """Group indexes into a shard set: `search --index OUT` then searches them in parallel, top-k merged."""
    from .shards import ShardedIndex, is_shard_set, register
    from .store.catalog import IndexFormatError

    if add and not is_shard_set(out_path):
        _fail(f"no shard set at {out_path} (drop --add to create one)", 2)
    try:
        if add:
            register(out_path, members)
            sharded = ShardedIndex.open(out_path)
        else:
            sharded = ShardedIndex.create(out_path, members)  # checks every member before writing anything
    except (IndexFormatError, OSError, ValueError) as exc:
        _fail(str(exc), 2)
    out.print(f"shard set {out_path}: {len(sharded.shards)} shards, {len(sharded)} images")


@app.command("tune")
def tune_cmd(
    index: Path = typer.Option(..., "--index", help="A segmented index."),
    queries: Path = typer.Option(..., "--queries", help="Queries with answers: Flickr8k captions.tsv, text<TAB>image TSV, or JSONL."),
    latency_budget_ms: Optional[float] = typer.Option(None, "--latency-budget-ms", help="Most accurate configuration within this per-query search latency."),
    sample: int = typer.Option(200, help="Queries sampled from the file."),
    tune_on: Optional[Path] = typer.Option(None, "--tune-on", help="Choose on this segmented index (e.g. of Flickr8k train images; same encoder and segments) and save the choice into --index, so the data that is reported did not choose (docs/himir.md)."),
    query_images: Optional[Path] = typer.Option(None, "--query-images", help="Only queries whose relevant images are all named in this list, one per line (e.g. flickr8k/splits/train.txt, or one half of dev)."),
    plot: Optional[Path] = typer.Option(None, help="Where to save the accuracy-latency plot (default: INDEX/tune.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    report: ReportOpt = None,
    candidates_only: bool = typer.Option(False, "--candidates-only", help="Choose only the candidate-stage size, behind the index's saved scheduler settings (no grid search)."),
    breadth_only: bool = typer.Option(False, "--breadth-only", help="Choose only the breadth of global search (HNSW efSearch / IVF lists probed) on an index whose global search is approximate, by recall@10 against exact search; needs no segments, and the queries' answers are unused."),
    recall: float = typer.Option(0.99, "--recall", help="--breadth-only without a latency budget: the smallest breadth reaching this recall@10."),
    agreement: Optional[float] = typer.Option(None, "--agreement", help="--candidates-only without a latency budget: the fastest candidate stage whose top-10 agreement with exhaustive search reaches this (e.g. 0.99), trying the scheduler's saved pruning and two gentler ones (which are saved with it when chosen), instead of the fewest images within 0.01 of the best."),
) -> None:
    """Pick T, alpha, tau and S_G of the hierarchical mode, then the candidate-stage size, and save them in the index."""
    from .tune import tune, tune_breadth, tune_stage

    idx = _open_index(index)
    if breadth_only:
        if tune_on is not None or candidates_only:
            _fail("--breadth-only is chosen on the index it is saved in: no --tune-on or --candidates-only", 2)
        try:
            query_list, source = _tune_queries(queries, query_images)
            result = tune_breadth(idx, query_list, sample=sample, latency_budget_ms=latency_budget_ms,
                                  recall=recall, query_source=source)
        except (ValueError, OSError) as exc:
            _fail(str(exc), 2)
        _print_breadth_choice(result, as_json, report, index)
        return
    if agreement is not None and not (candidates_only and 0 < agreement <= 1):
        _fail("--agreement goes with --candidates-only and is in (0, 1]", 2)
    chooser = _open_index(tune_on) if tune_on is not None else idx
    for name, i in ((index, idx), (tune_on, chooser)):
        if "segments" not in i.fields and "segments-compact" not in i.fields:  # originals dropped: compact only
            _fail(f"tune needs an index built with segments (finegrain index ... --segments 4,9,16,25,36): {name}", 2)
    try:
        query_list, source = _tune_queries(queries, query_images)
        if candidates_only:
            result = tune_stage(chooser, query_list, sample=sample, latency_budget_ms=latency_budget_ms, target=idx,
                                query_source=source, agreement=agreement)
        else:
            result = tune(chooser, query_list, sample=sample, latency_budget_ms=latency_budget_ms,
                          plot=plot or index / "tune.png", target=idx, query_source=source)
    except (ValueError, OSError) as exc:
        _fail(str(exc), 2)
    if candidates_only:
        _print_candidate_choice(result, as_json, report, index)
        return
    if report is not None:
        from .report import ReportData

        summary = {k: v for k, v in result.items()
                   if k not in ("trials", "chosen", "exhaustive", "plot", "chosen_on", "candidates")}
        summary["chosen_on"] = json.dumps(result["chosen_on"])
        summary.update({f"chosen_{k}": str(v) if isinstance(v, (list, tuple)) else v for k, v in result["chosen"].items()})
        summary.update({f"exhaustive_{k}": v for k, v in result["exhaustive"].items()})
        details = ReportData(images={"accuracy vs latency (chosen point marked)": Path(result["plot"])},
                             tables={"all trials": [{k: str(v) if isinstance(v, (list, tuple)) else v for k, v in t.items()}
                                                    for t in result["trials"]]})
        if "candidates" in result:  # the candidate-stage sizes tried after the scheduler's choice
            stage = result["candidates"]
            summary.update({"candidates_chosen": stage["chosen"], "candidates_agreement10": stage["agreement10"]})
            details.tables["candidate stage (top-10 agreement with exhaustive)"] = stage["trials"]
        _write_report(report, f"finegrain tune: {index}", summary, details)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "trials"}))
        return
    c, e = result["chosen"], result["exhaustive"]
    out.print(f"chosen T={c['T']} alpha={c['alpha']} tau={c['tau']} S_G={c['stride']} "
              f"skip_levels={list(c['skip_levels']) or 'none'} (profiled: {result['profiled_skip_levels'] or 'none'}): NDCG@10 "
              f"{result['chosen_ndcg10']:.4f}, {result['chosen_ms_per_query']:.2f} ms, {result['chosen_sim_ops']:.0f} ops/query "
              f"(exhaustive {e['ndcg10']:.4f}, {e['ms_per_query']:.2f} ms, {e['sim_ops']:.0f} ops); "
              f"saved in the index; chosen on {tune_on or 'this index'} with {result['queries']} queries; "
              f"plot {result['plot']}")
    if "candidates" in result:
        _print_candidate_choice(result, False, None, index)


def _tune_queries(queries: Path, query_images: Optional[Path]) -> tuple[list, str]:
    """`finegrain tune`'s queries (only those answered in ``query_images`` when given) and a name for their source."""
    from .tune import load_names, load_queries, restrict_queries

    query_list, source = load_queries(queries), queries.name
    if query_images is not None:
        query_list = restrict_queries(query_list, load_names(query_images))
        source += f" (answers in {query_images.name})"
    return query_list, source


def _print_breadth_choice(result: dict, as_json: bool, report: Optional[Path], index: Path) -> None:
    """`finegrain tune --breadth-only`'s choice: a line, or JSON; optionally an HTML report of the breadths tried."""
    b = result["breadth"]
    summary = {"queries": result["queries"], "kind": result["kind"], "chosen_on": json.dumps(result["chosen_on"]),
               "breadth_chosen": b["breadth"], "recall10": b["recall10"], "ms_per_query": b["ms_per_query"]}
    line = (f"global search breadth ({result['kind']}): {b['breadth']}, recall@10 {b['recall10']:.3f}, "
            f"{b['ms_per_query']:.2f} ms/query; saved in the index; tried "
            + ", ".join(f"{t['breadth']}: {t['recall10']:.3f}" for t in b["trials"])
            + f"; {result['queries']} queries from {result['chosen_on']['query_source']}")
    _print_tune_stage(result, as_json, report, f"finegrain tune --breadth-only: {index}", summary,
                      "breadths tried (recall@10 against exact search)", b["trials"], line)


def _print_candidate_choice(result: dict, as_json: bool, report: Optional[Path], index: Path) -> None:
    """`finegrain tune`'s candidate-stage choice: a line, or JSON; optionally an HTML report of the sizes tried."""
    st = result["candidates"]
    summary = {"queries": result["queries"], "chosen_on": json.dumps(result["chosen_on"]),
               "candidates_chosen": st["chosen"], "stage_chosen": st["stage"], "candidates_agreement10": st["agreement10"]}
    per = {"union": "per query vector", "fused": "in one fused search"}
    chosen = f"{st['stage']}, {st['chosen']} images {per[st['stage']]}" if st["chosen"] else \
        "every image (none saved; the default stays)"
    line = (f"candidate stage: {chosen}, "
            f"top-10 agreement with exhaustive {st['agreement10']:.3f}, {st['ms_per_query']:.2f} ms/query; tried "
            + ", ".join(f"{t['stage'] + ' ' + str(t['candidates']) if t['candidates'] else 'all'}: "
                        f"{t['agreement10']:.3f}" for t in st["trials"])
            + f"; chosen on {result['chosen_on']['index']} with {result['queries']} queries")
    _print_tune_stage(result, as_json, report, f"finegrain tune --candidates-only: {index}", summary,
                      "candidate stage (top-10 agreement with exhaustive)", st["trials"], line)


def _print_tune_stage(result: dict, as_json: bool, report: Optional[Path], title: str, summary: dict,
                      table: str, trials: list, line: str) -> None:
    """One tuned stage: the HTML report of its trials when asked, then JSON or the one-line summary."""
    if report is not None:
        from .report import ReportData

        _write_report(report, title, summary, ReportData(tables={table: trials}))
    if as_json:
        print(json.dumps(result))
        return
    out.print(line)


@app.command("encoders")
def encoders_cmd() -> None:
    """List the available encoders."""
    from .encoders import list_encoders

    for name, help_text in list_encoders().items():
        out.print(f"[bold]{name}[/bold]: {help_text}")


@app.command("train-aligner")
def train_aligner_cmd(
    data: Path = typer.Option(..., "--data", help="Flickr8k-style folder (images/, captions.tsv, splits/)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Where to write the trained weights (.safetensors, plus .json; default effnet-minilm[-v2].safetensors)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of frozen tower features (default ~/.cache/finegrain/aligner[-v2]-flickr8k)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of the cosine schedule (v1: 15, the best dev epoch is kept; v2: 10, the best validation-slice epoch)."),
    hidden: int = typer.Option(0, help="v1: hidden width of the projection heads' MLP (0: linear heads)."),
    train_image_top: bool = typer.Option(True, help="v1: fine-tune EfficientNet's last block and head conv."),
    text_attention: bool = typer.Option(True, help="v1: attention pooling of text tokens beside the mean."),
    gem: bool = typer.Option(True, help="v1: learnable GeM pooling of the image feature map (else average)."),
    augment: bool = typer.Option(True, help="v1: use mirrored images as a second view."),
    seed: int = typer.Option(0, help="Random seed."),
    recipe: str = typer.Option("v1", "--recipe", help="v1: effnet-minilm (towers frozen, image top tuned); v2: effnet-minilm-v2 (image tower locked, text tower tuned, docs/encoders.md)."),
    text_adapter: str = typer.Option("lora", "--text-adapter", help="v2: how MiniLM's top layers train: lora, delta (whole layers, shipped as a float16 delta) or frozen."),
    text_layers: int = typer.Option(1, "--text-layers", help="v2: MiniLM's top layers trained (0-2)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="v2: LoRA rank."),
    lr_text: float = typer.Option(5e-4, "--lr-text", help="v2: learning rate of the text tower's trained part."),
    views: int = typer.Option(0, "--views", help="v2: random-resized-crop views cached per train image (0: the image alone; each costs a tower pass over train)."),
    phrase_dropout: float = typer.Option(0.0, "--phrase-dropout", help="v2: probability of a caption with one phrase removed."),
    hard_negative: float = typer.Option(0.0, "--hard-negative", help="v2: weight of the hardest-in-batch-negative hinge (0: off; 0.5 tried)."),
    region: float = typer.Option(0.0, "--region", help="v2: weight of the region term (phrases vs grid regions; 0: off; 0.5 tried)."),
    val_images: Optional[int] = typer.Option(None, "--val-images", help="The last N train images validate (choose the epoch); dev is only reported (default v2: 500; v1: 0, dev chooses, as for the shipped weights)."),
    train_images: int = typer.Option(0, "--train-images", help="Train on the first N train images only (0: all but the validation slice)."),
) -> None:
    """Train the bundled model's trained parts on Flickr8k (v1: heads and image top; v2: LiT split, see docs/encoders.md)."""
    if recipe not in ("v1", "v2"):
        raise typer.BadParameter("--recipe must be v1 or v2")
    from .datasets import load_flickr8k

    try:  # both recipes train on train and report on dev: a wrong folder is a usage error, before any model loads
        for split in ("train", "dev"):
            load_flickr8k(data, split)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"--data: {exc}", 2)
    if recipe == "v2":
        from .train.aligner_v2 import TrainConfigV2, train_aligner_v2

        try:
            config_v2 = TrainConfigV2(text_adapter=text_adapter, text_layers=text_layers, lora_rank=lora_rank,
                                      lr_text=lr_text, views=views, phrase_dropout=phrase_dropout,
                                      hard_negative=hard_negative, region=region,
                                      val_images=500 if val_images is None else val_images,
                                      train_images=train_images, seed=seed, **({"epochs": epochs} if epochs else {}))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        out_v2 = out_path or Path("effnet-minilm-v2.safetensors")
        result = train_aligner_v2(data, out_v2, cache_dir or Path.home() / ".cache" / "finegrain" / "aligner-v2-flickr8k",
                                  config_v2, log=err.print, cache_views=views)
        m, v = result["dev_metrics"], result["val_metrics"]
        out.print(f"best epoch {result['best_epoch']} (chosen on the validation slice: t2i R@1 {v['t2i_r1']:.1f}); "
                  f"dev t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f}, i2t R@1 {m['i2t_r1']:.1f}; "
                  f"wrote {out_v2} (use it with --encoder effnet-minilm-v2:{out_v2})")
        return
    from .train.aligner import TrainConfig, check_selection, train_aligner

    out_path = out_path or Path("effnet-minilm.safetensors")
    try:
        config = TrainConfig(epochs=epochs or 15, hidden=hidden, train_image_top=train_image_top,
                             text_attention=text_attention, gem=gem, augment=augment, seed=seed,
                             val_images=val_images or 0, train_images=train_images)
        check_selection(data, config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = train_aligner(data, out_path, cache_dir or Path.home() / ".cache" / "finegrain" / "aligner-flickr8k",
                           config, log=err.print)
    m = result["dev_metrics"]
    chosen = "" if "val_metrics" not in result else \
        f" (chosen on the validation slice: t2i R@1 {result['val_metrics']['t2i_r1']:.1f})"
    out.print(f"best epoch {result['best_epoch']}{chosen}: dev t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f}; "
              f"wrote {out_path} (use it with --encoder effnet-minilm:{out_path})")


@app.command("train-objects")
def train_objects_cmd(
    out_path: Path = typer.Option(..., "--out", help="Where to write the adapter (.safetensors; a .json summary beside it)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Flickr8k folder: composites from its train split (the last --holdout images validate)."),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of your photos: composites made from them (the last ones by path validate)."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index: composites from its photos, with its encoder and object settings."),
    composites: int = typer.Option(2000, "--composites", help="Training composites (about 0.3 s each to encode on one core; cached)."),
    val_composites: int = typer.Option(300, "--val-composites", help="Validation composites, from the held-out images only."),
    holdout: int = typer.Option(0, "--holdout", help="Images held out for validation (0: 600 for Flickr8k, else 10 %, at least 2)."),
    rank: int = typer.Option(16, "--rank", help="Rank of the adapter's residual (0: per-channel scale only)."),
    epochs: int = typer.Option(30, "--epochs", help="Most epochs (early stopping on the validation composites)."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    select: str = typer.Option("objects-max", "--select", help="Validation MRR that picks the epoch: objects-max (what auto uses) or objects."),
    seed: int = typer.Option(0, "--seed", help="Random seed (composites and training)."),
    encoder: str = typer.Option("effnet-minilm", "--encoder", help="Encoder (--index uses the index's)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of the composites' crop vectors (default ~/.cache/finegrain/stagea-<source>)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar while encoding composites."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (also written next to --out as .json)."),
) -> None:
    """Train a MaO Stage A object adapter on composites (docs/mao.md); use it with `index --objects ... --object-adapter`."""
    import hashlib

    from .images import ImageLoadError
    from .objects.adapter import AdapterError
    from .train.objects import TrainObjectsConfig, train_objects

    try:
        config = TrainObjectsConfig(n_train=composites, n_val=val_composites, holdout=holdout, rank=rank,
                                    epochs=epochs, lr=lr, select=select, seed=seed, encoder=encoder)
        source = data or images or index
        if cache_dir is None:
            tag = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:12] if source else "none"
            cache_dir = Path.home() / ".cache" / "finegrain" / ("stagea-flickr8k" if data else f"stagea-{tag}")
        summary = train_objects(out_path, config, cache_dir, data=data, images=images, index=index,
                                show_progress=progress and not as_json, log=err.print)
    except (FileNotFoundError, ValueError, ImageLoadError, AdapterError) as exc:
        _fail(str(exc), 2)
    except KeyError as exc:  # an unknown encoder name
        _fail(str(exc.args[0]) if exc.args else "unknown encoder", 2)
    except OSError as exc:
        _fail(f"cannot train the object adapter: {exc}")
    if as_json:
        print(json.dumps(summary))
        return
    b, a = summary["val_before"], summary["val_after"]
    out.print(f"chosen epoch {summary['chosen_epoch']} of {summary['epochs_run']} (by validation {summary['select']} MRR"
              f"{', the identity: nothing beat it' if summary['identity'] else ''}); validation MRR objects "
              f"{b['objects_mrr']:.3f} -> {a['objects_mrr']:.3f}, objects-max {b['objects_max_mrr']:.3f} -> "
              f"{a['objects_max_mrr']:.3f} on {summary['composites']['val']} held-out composites; wrote {out_path} "
              f"(use it with finegrain index --objects regions --object-adapter {out_path})")


@bench_app.command("flickr8k")
def bench_flickr8k_cmd(
    data: Path = typer.Option(..., "--data", help="Flickr8k-style folder."),
    split: str = typer.Option("dev", help="Split to evaluate (dev or test)."),
    mode: str = typer.Option("global", help="Search mode: global, single, exhaustive, hierarchical."),
    encoder: EncoderOpt = "effnet-minilm",
    segments: str = typer.Option("4,9,16,25,36", help="Granularities of the segmented bench index (multi-vector modes)."),
    segment_embed: str = typer.Option("pool", help="Segment embedding of the bench index: pool or crop."),
    cache_dir: BenchCacheOpt = BENCH_CACHE,
    index: Optional[Path] = typer.Option(None, "--index", help="Search this existing index instead of building one: it must hold every image of the split; its other images are distractors. --encoder/--segments then come from the index."),
    as_json: JsonLastLineOpt = False,
    report: ReportOpt = None,
) -> None:
    """Text->image and image->text retrieval on Flickr8k: recall, NDCG@10, speed."""
    from .bench.flickr8k import run_flickr8k
    from .report import ReportData

    details = ReportData()

    try:
        from .decompose.segments import SegmentConfig

        seg = SegmentConfig(levels=_int_list(segments), embed=segment_embed) if mode != "global" else None
        from .store.catalog import IndexFormatError

        result = run_flickr8k(data, split, mode=mode, encoder=encoder, cache_dir=cache_dir, show_progress=not as_json,
                              segments=seg, report=details, index_path=index)
        encoder = result["encoder"]
    except (FileNotFoundError, ValueError, IndexFormatError) as exc:
        _fail(str(exc), 2)
    _print_metrics(f"Flickr8k {split}, mode {mode}, encoder {encoder}", result)
    _write_report(report, f"Flickr8k {split}, mode {mode}, encoder {encoder}", result, details)
    if as_json:
        print(json.dumps(result))


@bench_app.command("revisitop")
def bench_revisitop_cmd(
    data: RevisitopDataOpt,
    gnd: GndOpt = None,
    distractors: DistractorsOpt = None,
    distractor_list: DistractorListOpt = None,
    mode: str = typer.Option("global", help="Search mode: global, global+local, local, l2g (the last three need --local)."),
    encoder: EncoderOpt = "effnet-minilm",
    local: Optional[str] = typer.Option(None, "--local", help="Bench index with local features from this extractor (cnn, sift, disk)."),
    local_scales: Optional[str] = typer.Option(None, "--local-scales", help="--local cnn: image scales, e.g. 1.0,0.707,0.5."),
    local_features: Optional[int] = typer.Option(None, "--local-features", help="--local: local features kept per image."),
    local_image_size: Optional[int] = typer.Option(None, "--local-image-size", help="--local: longer image side at scale 1."),
    shortlist: ShortlistOpt = None,
    mds_dim: MdsDimOpt = None,
    smacof_iter: SmacofIterOpt = None,
    w: WOpt = None,
    knn: KnnOpt = None,
    exact_rerank: ExactRerankOpt = None,
    variant: VariantOpt = None,
    pairs: PairsOpt = None,
    global_field: Optional[str] = typer.Option(None, "--global-field", help="instance (multi-scale GeM, needs --local cnn) or joint; with mode global, 'instance' searches the GeM descriptor."),
    cache_dir: BenchCacheOpt = BENCH_CACHE,
    as_json: JsonLastLineOpt = False,
    report: ReportOpt = None,
    index_only: bool = typer.Option(False, "--index-only", help="Build (or resume) the cached bench index of database + distractors, then stop."),
    available: bool = typer.Option(False, "--available", help="Index nothing: search the database plus only the distractors the cached index holds so far (recorded in the result)."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Landmark folds (2): choose the mode's settings on one half of the landmarks, report on the other, then swap (l2g)."),
) -> None:
    """Image-to-image instance retrieval, Revisited Oxford/Paris protocol: mAP Easy/Medium/Hard, mP@k, latency."""
    from .bench.revisitop import run_revisitop
    from .eval.revisitop import UnsafePickleError
    from .report import ReportData

    details = ReportData()

    try:
        if index_only and available:
            raise ValueError("--index-only and --available exclude each other")
        if folds is not None:
            from .bench.revisitop_folds import run_revisitop_folds

            result = run_revisitop_folds(data, gnd, distractors, distractor_list, mode=mode, encoder=encoder,
                                         cache_dir=cache_dir, show_progress=not as_json, n_folds=folds,
                                         local=_local_config(local, local_scales, local_features, local_image_size),
                                         available_only=available, log=lambda message: err.print(message))
            _print_fold_table(result)
            if as_json:
                print(json.dumps(result))
            return
        result = run_revisitop(data, gnd, distractors, distractor_list, mode=mode, encoder=encoder, cache_dir=cache_dir,
                               show_progress=not as_json, report=details, available_only=available,
                               index_only=index_only,
                               local=_local_config(local, local_scales, local_features, local_image_size),
                               **_local_search_options(shortlist, mds_dim, smacof_iter, w, knn, global_field, exact_rerank,
                                                       _l2g_variant(variant, mode), pairs))
    except (FileNotFoundError, ValueError, UnsafePickleError) as exc:
        _fail(str(exc), 2)
    if index_only:
        err.print(f"bench index: {result['indexed']} images ({result['database']} database + "
                  f"{result['distractors']} distractors)")
        if as_json:
            print(json.dumps(result))
        return
    title = f"{data.name}, mode {mode}, encoder {encoder}, {result['distractors']} distractors"
    _print_metrics(title, result)
    _write_report(report, title, result, details)
    if as_json:
        print(json.dumps(result))


def _write_report(path: Optional[Path], title: str, metrics: dict, details) -> None:
    """Write the HTML report when ``--report`` was given (message on stderr, so --json stays clean)."""
    if path is None:
        return
    from .report import write_report

    write_report(path, title, metrics, details, command=" ".join(["finegrain", *sys.argv[1:]]))
    err.print(f"report: {path}")


@bench_app.command("compress")
def bench_compress_cmd(
    data: RevisitopDataOpt,
    gnd: GndOpt = None,
    distractors: DistractorsOpt = None,
    distractor_list: DistractorListOpt = None,
    methods: str = typer.Option("pca,aesvc,ss2d", "--methods", help="Comma-separated: pca, aesvc, aesvc-paper (AE-SVC with the paper's loss), ss2d."),
    dims: str = typer.Option("16,32,64,128,256", "--dims", help="Comma-separated output sizes (SS2D: one model, all sizes nested)."),
    encoder: EncoderOpt = "effnet-minilm",
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write the similarity-distribution and per-dimension-variance PNGs here."),
    text_data: Optional[Path] = typer.Option(None, "--text-data", help="Also a text-to-image check on this Flickr8k folder (projection applied to both towers)."),
    text_split: str = typer.Option("dev", "--text-split", help="Split of --text-data."),
    seed: int = typer.Option(0, help="Seed of the learned projections."),
    ss2d_teacher: str = typer.Option("aesvc", "--ss2d-teacher", help="Whose similarities SS2D distils: aesvc (the paper) or input (the original embeddings)."),
    cache_dir: BenchCacheOpt = BENCH_CACHE,
    as_json: JsonLastLineOpt = False,
    folds: Optional[int] = typer.Option(None, "--folds", help="Landmark folds (2): choose each method's settings on one half of the landmarks by class mAP, report on the other, then swap."),
    epochs: str = typer.Option("25,50,100", "--epochs", help="--folds: AE-SVC training lengths (passes over the data) to choose from."),
    available: bool = typer.Option(False, "--available", help="Index nothing: use the database plus only the distractors the cached index holds so far."),
) -> None:
    """Compact embeddings: PCA / AE-SVC / (SS)2D at several sizes, Revisited mAP (Medium) and landmark-class mAP."""
    from .bench.compress import run_compress_bench
    from .eval.revisitop import UnsafePickleError

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if folds is not None:
        from .bench.compress_folds import run_compress_folds

        try:
            folded = run_compress_folds(data, gnd, distractors, distractor_list, _int_list(dims), encoder, cache_dir,
                                        seed, folds, _int_list(epochs), available_only=available, show_progress=not as_json,
                                        log=lambda message: err.print(message))
        except (FileNotFoundError, ValueError, UnsafePickleError) as exc:
            _fail(str(exc), 2)
        _print_fold_table(folded)
        if as_json:
            print(json.dumps(folded))
        return
    if available:
        _fail("--available is for --folds here; finegrain bench revisitop --available for one run", 2)
    try:
        result = run_compress_bench(data, gnd, distractors, distractor_list, method_list, _int_list(dims), encoder,
                                    cache_dir, plots, text_data, text_split, seed, show_progress=not as_json,
                                    log=lambda message: err.print(message), ss2d_teacher=ss2d_teacher)
    except (FileNotFoundError, ValueError, UnsafePickleError) as exc:
        _fail(str(exc), 2)
    table = Table("method", "dim", "mAP Medium", "class mAP", "bytes/image", "fit s",
                  title=f"{data.name}: {result['database']} images + {result['distractors']} distractors, "
                        f"{result['queries']} queries, encoder {encoder}", title_justify="left")
    for r in result["results"]:
        table.add_row(r["method"], str(r["dim"]), f"{r['map_medium']:.2f}", f"{r['class_map']:.2f}",
                      str(r["bytes_per_image"]), f"{r['fit_seconds']:.1f}")
    Console(stderr=True).print(table) if as_json or not sys.stdout.isatty() else out.print(table)
    if "text_to_image" in result:
        tt = Table("method", "dim", "R@1", "R@5", "R@10", title="text -> image (Flickr8k)", title_justify="left")
        for r in result["text_to_image"]:
            tt.add_row(r["method"], str(r["dim"]), f"{r['r1']:.2f}", f"{r['r5']:.2f}", f"{r['r10']:.2f}")
        Console(stderr=True).print(tt) if as_json or not sys.stdout.isatty() else out.print(tt)
    if "plots" in result:
        err.print(f"figures: {result['plots']['similarity_png']}, {result['plots']['variance_png']}")
    if as_json:
        print(json.dumps(result))


def _print_fold_table(result: dict) -> None:
    """The per-fold rows of a ``--folds`` bench: each reported on one fold with settings chosen on another."""
    table = Table("reported on", "chosen on", "method", "setting", "dim", "class mAP", "mAP Medium",
                  title=f"{result['dataset']}: {result['protocol']}", title_justify="left")
    for r in result["results"]:
        table.add_row(r["fold"], r["chosen_on"] or "", r.get("method", r.get("row", "")), r.get("setting", ""),
                      str(r.get("dim", "")), f"{r['class_map']:.2f}", f"{r['map_medium']:.2f}")
    Console(stderr=True).print(table) if not sys.stdout.isatty() else out.print(table)


def _mode_list(text: str) -> list[str]:
    """Modes of ``bench scale``: ';'-separated when any has options (which use ','), else ','-separated."""
    parts = text.split(";") if ";" in text or ":" in text else text.split(",")
    return [m.strip() for m in parts if m.strip()]


@bench_app.command("scale")
def bench_scale_cmd(
    data: Path = typer.Option(..., "--data", help="Flickr8k-style folder: its captions are the queries (and its images the source, without --source)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Index whose vectors synthetic images are drawn from (default: the segmented Flickr8k bench index of --split)."),
    split: str = typer.Option("dev", help="Flickr8k split of the queries (and of the default source)."),
    sizes: str = typer.Option("10000", help="Comma-separated numbers of images, e.g. 10000,100000 (empty with --quality: the quality run alone)."),
    modes: str = typer.Option("global,hierarchical,exhaustive", help="Semicolon- or comma-separated modes: global, single, exhaustive, hierarchical (segments); objects, objects-max, objects-refined (objects); instance, global+local, local, l2g (local features, image queries); options after a colon, e.g. 'hierarchical:candidates=500,T=0.6;exhaustive'."),
    queries: int = typer.Option(50, help="Queries per mode and size: captions (and, for the image-only modes, --split images) drawn with --seed."),
    fields: Optional[str] = typer.Option(None, "--fields", help="Field families the synthetic images copy besides global: comma-separated segments, objects, local, or 'all' (what the source has); default: what --modes and --peers need."),
    mode_timeout: Optional[float] = typer.Option(None, "--mode-timeout", help="Seconds a mode may take (its process: warm-up, first-use structures and queries) before it is stopped; its row then says so."),
    local_features: Optional[int] = typer.Option(None, "--local-features", help="With the local family: keep at most this many local descriptors per synthetic image (the strongest), as an index built with --local-features N stores."),
    storage_spec: Optional[str] = typer.Option(None, "--storage", help="Fields stored compact, FIELD=METHOD:DIM:QUANTIZE pairs, comma-separated (e.g. segments=pca:64:int8,objects=pca:64:int8,local=none::int8): fitted on the first 20,000 images, originals dropped."),
    noise: float = typer.Option(0.5, help="Noise norm added to each copied unit vector (cosine to its source about 1/sqrt(1+noise^2))."),
    seed: int = typer.Option(0, help="Seed of the synthetic vectors and the query sample."),
    ann: str = typer.Option("auto", help="ANN setting of the synthetic indexes (auto, flat, hnsw, ivf)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild synthetic indexes even when cached."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "finegrain" / "bench", "--cache-dir", help="Where bench and synthetic indexes are kept."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line, one per (size, system, mode)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write an HTML report (tables, log-log growth plot) here."),
    peers: Optional[str] = typer.Option(None, "--peers", help="Other engines on the same vectors, comma-separated or 'all': numpy-maxsim, faiss-flat-rescore, qdrant-edge, qdrant-local, qdrant-server, lancedb, fast-plaid (multi-vector); faiss-hnsw, faiss-ivf, usearch, hnswlib (global). Missing ones give a skipped row."),
    peer_envs: bool = typer.Option(True, "--peer-envs/--no-peer-envs", help="Let fast-plaid make its own virtualenv under --cache-dir (torch 2.11 from PyPI) when it has none."),
    quality: int = typer.Option(0, "--quality", help="Also run finegrain's modes and the peers on the real source index with this many --split captions as labelled queries: NDCG@10, R@1/5/10 per system (0: off)."),
    segment_storage: Optional[str] = typer.Option(None, "--segment-storage", help="Store the synthetic segments compact, METHOD:DIM:QUANTIZE (e.g. pca:64:int8, none::float16): fitted on the first 20,000 images, originals dropped (what reaches 10^6 images on one disk)."),
    build_only: bool = typer.Option(False, "--build-only", help="Build (or reuse) the synthetic indexes and their global search structures, measure nothing: run the long builds beside other work, then the same command without it alone on the machine."),
) -> None:
    """How latency, agreement with exact search, RSS and disk grow with the number of images (synthetic indexes)."""
    import tempfile

    from rich.table import Column

    from .bench.scale import (
        FieldStorage,
        flickr8k_image_queries,
        flickr8k_queries,
        flickr8k_source,
        growth,
        plot_growth,
        run_scale,
    )
    from .report import ReportData

    size_list = _int_list(sizes)
    mode_list = _mode_list(modes)
    try:
        from .bench.peers import parse_peers

        peer_list = parse_peers(peers) if peers else []
        storage = FieldStorage.parse_fields(storage_spec) if storage_spec else {}
        if segment_storage:
            if "segments" in storage:
                raise ValueError("give the segments' storage once: --segment-storage or --storage segments=...")
            storage["segments"] = FieldStorage.parse(segment_storage)
        texts = flickr8k_queries(data, split, queries, seed)
        images = flickr8k_image_queries(data, split, queries, seed)
        if source is None:
            source = flickr8k_source(data, split, cache_dir=cache_dir, show_progress=not as_json)
        rows = run_scale(source, size_list, cache_dir, texts, mode_list, noise=noise, seed=seed, ann=ann,
                         rebuild=rebuild, show_progress=not as_json, log=err.print, peers=peer_list,
                         create_envs=peer_envs, storage=storage, build_only=build_only,
                         fields=[f.strip() for f in fields.split(",") if f.strip()] if fields else None,
                         images=images, local_features=local_features, mode_timeout=mode_timeout)
        if build_only:
            return
        quality_rows = []
        if quality > 0:
            from .bench.peers import run_quality

            quality_rows = run_quality(source, data, split, peer_list, mode_list, quality, seed=seed,
                                       cache_dir=cache_dir, create_envs=peer_envs, log=err.print)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), 2)
    table = Table("images", Column("mode", no_wrap=True), "p50 ms", "p95 ms", "agree@10", "RSS MB", "KiB/image", "build s",
                  title="bench scale (synthetic vectors drawn from a real index)", title_justify="left")
    if peer_list:
        table.columns[1].header = "system / mode"
    for r in rows:
        label = r["mode"] if r["system"] == "finegrain" else f"{r['system']} ({r['mode']})"
        if r["p50_ms"] is None:  # a peer that could not run: its reason instead of numbers
            table.add_row(f"{r['images']:,}", label, "skipped", "", "", "", "", "", end_section=False)
            err.print(f"{r['system']}: skipped: {r.get('skipped')}")
            continue
        agree = "ref" if r["agreement_at_10"] is None else f"{r['agreement_at_10']:.3f}"
        table.add_row(f"{r['images']:,}", label, f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", agree,
                      f"{r['rss_mb']:.0f}", f"{r['disk_bytes_per_image'] / 1024:.1f}", f"{r['build_s']:.0f}")
    Console(stderr=True).print(table) if as_json or not sys.stdout.isatty() else out.print(table)
    if quality_rows:
        qt = Table("system / mode", "NDCG@10", "R@1", "R@5", "R@10", "agree@10",
                   title=f"quality on the real source index ({quality_rows[0]['images']:,} images, {quality_rows[0]['queries']} captions)",
                   title_justify="left")
        for r in quality_rows:
            label = f"{r['system']} ({r['mode']})"
            if r["p50_ms"] is None:
                qt.add_row(label, "skipped", "", "", "", "")
                continue
            qt.add_row(label, f"{r['ndcg_at_10']:.4f}", f"{r['r1']:.1f}", f"{r['r5']:.1f}", f"{r['r10']:.1f}",
                       f"{r['agreement_at_10']:.3f}")
        Console(stderr=True).print(qt) if as_json or not sys.stdout.isatty() else out.print(qt)
        rows = rows + quality_rows
    if report is not None:
        with tempfile.TemporaryDirectory() as tmp:
            details = ReportData(tables={"Per size and mode": [r for r in rows if "quality" not in r],
                                         "Growth (smallest to largest size)": growth([r for r in rows if "quality" not in r])})
            if quality_rows:
                details.tables["Quality on the real source index (labelled captions)"] = quality_rows
            if len(size_list) > 1:
                details.images["p50 latency against images (log-log)"] = plot_growth([r for r in rows if "quality" not in r], Path(tmp) / "growth.png")
            _write_report(report, "finegrain bench scale", {"sizes": sizes, "modes": modes, "noise": noise,
                                                            "queries": queries, "peers": peers or ""}, details)
    if as_json:
        for r in rows:
            print(json.dumps(r))


@bench_app.command("needles")
def bench_needles_cmd(
    data: Path = typer.Option(..., "--data", help="Needles folder: scenes/, queries/, gnd.json."),
    mode: str = typer.Option("objects", help="Search mode: global, global-raw, hierarchical, objects, objects-max, objects-refined."),
    proposals: str = typer.Option("regions", help="Object proposals of the bench index: regions or yolox."),
    min_crop: int = typer.Option(0, help="Minimum object crop side in pixels (0: tight crops; the paper uses 224)."),
    threshold: Optional[float] = typer.Option(None, help="yolox proposals: detector score threshold (default 0.2, as the paper)."),
    refine_iters: int = typer.Option(80, help="Refinement steps of the objects-refined bench index."),
    refine_variant: str = typer.Option("finegrain", "--refine-variant", help="objects-refined: Stage B objective, finegrain or paper (docs/mao.md)."),
    raw_size: Optional[int] = typer.Option(None, help="global-raw mode: input side for scenes and queries (default: the encoder's, 224)."),
    encoder: EncoderOpt = "effnet-minilm",
    cache_dir: BenchCacheOpt = BENCH_CACHE,
    as_json: JsonLastLineOpt = False,
) -> None:
    """Small-object retrieval on the needles composites: mAP over queries and by pasted-area bucket."""
    from .bench.needles import run_needles
    from .objects.proposals import ProposerUnavailable

    try:
        result = run_needles(data, mode=mode, proposals=proposals, min_crop=min_crop, refine_iters=refine_iters,
                             encoder=encoder, cache_dir=cache_dir, show_progress=not as_json, raw_size=raw_size,
                             threshold=threshold, refine_variant=refine_variant)
    except (FileNotFoundError, ValueError, ProposerUnavailable) as exc:
        _fail(str(exc), 2)
    flat = {k: v for k, v in result.items() if k != "map_by_area"}
    flat.update({f"map_{k}": v for k, v in result["map_by_area"].items()})
    _print_metrics(f"needles, mode {mode}, encoder {encoder}", flat)
    if as_json:
        print(json.dumps(result))


def _print_metrics(title: str, result: dict) -> None:
    table = Table("metric", "value", title=title, title_justify="left")
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else (json.dumps(value) if isinstance(value, dict) else str(value)))
    Console(stderr=True).print(table) if not sys.stdout.isatty() else out.print(table)


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo-output"), "--out", help="Folder for sample images, the index and results.html."),
) -> None:
    """Index bundled sample photos, run a few queries, write an HTML page of the results."""
    from .demo import run_demo

    run_demo(out_dir, console=out)


@app.command("watch")
def watch_cmd(
    folders: list[Path] = typer.Argument(..., help="Folders to watch (recursively)."),
    index: Path = typer.Option(..., "--index", help="Index folder (created with default settings if missing)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder for a new index (default effnet-minilm)."),
    poll: bool = typer.Option(False, "--poll", help="Poll the folders (stat every --interval seconds) instead of file-system events: for network mounts (NFS, SMB) that send none."),
    interval: float = typer.Option(1.0, min=0.05, help="With --poll: seconds between two scans of the folders."),
    quiet: float = typer.Option(2.0, min=0.0, help="Commit after this many seconds without file events."),
    settle: float = typer.Option(1.0, min=0.0, help="Index a file once its size and mtime held still this long (files being copied wait)."),
    max_batch: int = typer.Option(256, "--max-batch", min=1, help="Commit as soon as this many files are ready, even while events continue."),
    max_wait: float = typer.Option(30.0, "--max-wait", min=0.0, help="Commit what is ready once a change waited this long, even while events continue."),
    no_scan: bool = typer.Option(False, "--no-scan", help="Skip the start-up scan that catches up with changes made while no watch ran."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per commit on stdout (instead of a log line on stderr)."),
) -> None:
    """Keep an index current as image files are added, changed, moved or deleted (until Ctrl-C or SIGTERM)."""
    import threading
    import time

    from .encoders import UnknownEncoder
    from .index import DEFAULT_ENCODER, Index, IndexLockedError, settings_differences
    from .store.catalog import IndexFormatError
    from .terminal import escape_controls
    from .watch import WatchCommit, Watcher, install_stop_signals

    def log(commit: WatchCommit) -> None:
        if as_json:
            print(json.dumps(commit.as_dict()), flush=True)
        else:
            err.print(f"{time.strftime('%H:%M:%S')} {commit.line()}", markup=False, highlight=False, soft_wrap=True)
            for path, reason in commit.failed[:20]:
                err.print(f"  skipped {escape_controls(path)}: {escape_controls(reason)}", markup=False, highlight=False,
                          soft_wrap=True)

    for folder in folders:  # before an index is created for nothing
        if not folder.is_dir():
            _fail(f"cannot watch {folder}: not a folder")
    stop = threading.Event()
    install_stop_signals(stop)  # before the model loads: a Ctrl-C during start-up still ends cleanly
    try:
        if (index / "finegrain.sqlite").exists():
            idx = Index.open(index)
            diff = settings_differences(idx.snapshot.settings, {"encoder": encoder} if encoder else {})
            if diff:
                raise _SettingsMismatch(f"the index at {index} was created with another encoder ({'; '.join(diff)})")
        else:
            idx = Index.create(index, encoder=encoder or DEFAULT_ENCODER)
        watcher = Watcher(idx, folders, poll=poll, interval=interval, quiet=quiet, settle=settle,
                          max_batch=max_batch, max_wait=max_wait, log=log)
        if not as_json:
            err.print(f"watching {', '.join(map(escape_controls, watcher.roots))} ({'polling' if poll else 'file-system events'}); "
                      "Ctrl-C to stop", markup=False, highlight=False, soft_wrap=True)
        watcher.run(stop, scan=not no_scan)
    except (_SettingsMismatch, UnknownEncoder) as exc:
        _fail(str(exc), 2)
    except (IndexFormatError, IndexLockedError, FileExistsError, KeyError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    if not as_json:
        left = len(watcher.changes)
        err.print("stopped" + (f"; {left} files still changing are left to the next start's scan" if left else ""),
                  markup=False, highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(
    index: IndexOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback only by default; set an API key before exposing it)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FINEGRAIN_API_KEY", help="Require this key on /api (Authorization: Bearer KEY or X-API-Key: KEY)."),
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host", help="Also answer requests addressed to this name (repeatable; '*' for any). Loopback names and the --host address are always allowed; others get 421 (DNS rebinding)."),
    reload_interval: float = typer.Option(1.0, help="Seconds between checks for images added by `finegrain index` (re-opened without a restart)."),
    torch_threads: int = typer.Option(1, help="torch threads per search (searches run in parallel threads; 1 suits small queries)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
    ray: bool = typer.Option(False, "--ray", help="Shard set: serve it with Ray actors (one or more per shard) instead of threads; docs/scaling.md."),
    ray_address: Optional[str] = typer.Option(None, "--address", help="With --ray: the cluster (auto, ray://HOST:10001); default: a local Ray runtime."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: actors per shard (throughput, failover)."),
    prepare: bool = typer.Option(False, "--prepare", help="Build every mode's search structures first (as `finegrain prepare`), so no request waits for them (hours for l2g at 10^5 images)."),
) -> None:
    """Serve the search API and the web page (http://HOST:PORT/) over an index or a shard set; see docs/service.md."""
    import ipaddress

    import torch
    import uvicorn

    from .service import create_app
    from .service.slowclients import HEADER_TIMEOUT_S, timed_h11_protocol
    from .store.catalog import IndexFormatError

    if api_key is None and os.environ.get("FINEGRAIN_API_KEY") is not None:
        api_key = os.environ["FINEGRAIN_API_KEY"]  # click reads an empty variable as unset: auth would be off
    if api_key is not None and not api_key.strip():
        _fail("the API key is empty (--api-key or FINEGRAIN_API_KEY); give a real key, or unset it to serve "
              "without one", 2)
    try:
        address = ipaddress.ip_address(host)
        loopback, wildcard = address.is_loopback, address.is_unspecified
    except ValueError:
        loopback, wildcard = host == "localhost", False
    allowed = list(allowed_host or []) + ([] if loopback or wildcard else [host])
    _check_port(host, port)
    if wildcard and not allowed_host:
        err.print(f"[yellow]note:[/yellow] bound to {host}: only requests addressed to a loopback name are answered; "
                  "add --allowed-host NAME for each name or address clients use")
    if not loopback and not api_key:
        err.print(f"[yellow]warning:[/yellow] serving on {host} without an API key: anyone who can reach it can search")
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if prepare:
        from .shards import is_shard_set

        if is_shard_set(index):
            _fail("--prepare takes an index; prepare each shard with `finegrain prepare --index SHARD`", 2)
        try:
            ready = _open_index(index).prepare(None, show_progress=True)
        except (ValueError, OSError, sqlite3.DatabaseError) as exc:
            _fail(f"preparing {index}: {exc}")
        err.print("prepared: " + ", ".join(mode for mode, built in ready.items() if built))
    try:
        service = create_app(index, api_key=api_key, reload_interval=reload_interval, allowed_hosts=tuple(allowed),
                             ray=ray, ray_address=ray_address, replicas=replicas)
    except IndexFormatError as exc:
        _fail(str(exc))
    except (ValueError, RuntimeError, ConnectionError) as exc:  # --ray on an index; no Ray, or no cluster there
        _fail(str(exc), 2 if isinstance(exc, ValueError) else 1)
    _read_only_note(index, _catalog_read_only(index))
    err.print(f"serving {index} on http://{host}:{port}/ (API: /api, schema: /openapi.json)")
    uvicorn.run(service, host=host, port=port, access_log=access_log, log_level="info", limit_concurrency=256,
                timeout_graceful_shutdown=5, http=timed_h11_protocol(HEADER_TIMEOUT_S))


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the model loads and "serving" is printed (bound as uvicorn binds)."""
    import errno
    import socket

    if port == 0:  # any free port: nothing to check
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                _fail(f"port {port} on {host} is already in use: stop what holds it, or give another --port", 2)
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 2)


def _catalog_read_only(index: Path) -> Optional[str]:
    """Why the index's catalog opens read-only, or None (a shard set, or anything unreadable: not this note's job)."""
    from .store.catalog import Catalog, IndexFormatError

    try:
        with Catalog(index) as catalog:
            return catalog.read_only
    except (IndexFormatError, OSError):
        return None


@app.command("check")
def check_cmd(
    index: IndexOpt,
    repair: bool = typer.Option(False, "--repair", help="Rebuild what can be rebuilt (cached search structures, damage marks, checksums of chunks written by older versions) and say what cannot."),
    drop_damaged: bool = typer.Option(False, "--drop-damaged", help="With --repair: remove the images whose vectors are in damaged chunks (a `finegrain index` re-run re-adds them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify an index fully: every byte against its checksum, every owner id, NaN/inf, cached structures.

    One line per problem; exit 0 when clean, 1 when damaged (or when --repair left something unrepaired).
    Damage found is recorded in the index, so searches refuse the damaged chunks until repaired.
    """
    from .index import IndexLockedError
    from .store import integrity
    from .store.catalog import IndexFormatError
    from .terminal import escape_controls

    if drop_damaged and not repair:
        _fail("--drop-damaged goes with --repair", 2)
    result = None
    try:
        if repair:
            report, result = integrity.repair_index(index, drop_damaged=drop_damaged)
        else:
            report = integrity.check_index(index)
    except IndexFormatError as exc:
        _fail(str(exc))
    except IndexLockedError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.DatabaseError) as exc:
        _fail(_write_error(exc, index))
    if as_json:
        doc = report.as_dict()
        if result is not None:
            doc["repair"] = {"done": result.done, "cannot": result.cannot, "removed": result.removed}
        print(json.dumps(doc))
    else:
        for p in report.problems:
            print(escape_controls(f"damaged: {p.message}"))
        for note in report.notes:
            print(escape_controls(f"note: {note}"))
        if report.problems and report.recorded and result is None:
            print("note: the damage is recorded in the index: searches refuse the damaged chunks until "
                  "`finegrain check --repair` deals with them")
        if result is not None:
            for line in result.done:
                print(escape_controls(f"repaired: {line}"))
            for line in result.cannot:
                print(escape_controls(f"cannot repair: {line}"))
        state = "damaged index" if report.problems else "ok"
        found = f"{len(report.problems)} problem(s)"
        if result is not None and report.problems:  # the figures are what the check found; say how it ended
            state = "damaged index, not all repaired" if result.cannot else "repaired index"
            found += " found before the repair"
        print(f"{state}: {report.chunks} chunk(s), {report.verified} verified against their checksums, "
              f"{len(report.unverified)} unverified (no checksum: written before checksums; --repair records them), "
              f"{report.files} file(s), {report.bytes} bytes, {report.caches} cache file(s), {found}")
    if result is not None:
        raise typer.Exit(1 if result.cannot else 0)
    raise typer.Exit(1 if report.problems else 0)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
