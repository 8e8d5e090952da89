"""Fuzz the image loader and indexing with generated files: zero crashes and zero unhandled exceptions.

Generates N files (default 10,000) from small real photos (scikit-image) in
JPEG (baseline, progressive, CMYK, greyscale), PNG (RGB, RGBA, palette,
16-bit), GIF (animated), BMP, TIFF (LZW, CMYK) and WebP, then mutates most
of them: random byte flips, inserted and deleted runs, truncation, splices
of two files, header size fields set to random values (PNG IHDR, JPEG SOF,
GIF/BMP headers), image magic numbers followed by random bytes, and plain
random bytes; names carry an image suffix that may not match the content.

1. **Loader**: every file goes through ``finegrain.images.load_image_sized``
   in a worker subprocess. An outcome is an image (RGB, positive size) or
   an ``ImageLoadError``; anything else is an *unhandled exception*. A worker
   that dies (segfault, abort, out-of-memory kill) or stalls for 120 s is a
   *crash*: the file is recorded and a new worker goes on with the next one.
2. **Indexing**: ``finegrain index FOLDER --index NEW --json`` in a
   subprocess: it must exit 0 with no traceback, and count every file as
   indexed or failed.

    python -m tools.stress.fuzz_images --files 10000 --json
    python -m tools.stress.fuzz_images --files 500            # quick
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"]

WORKER = r"""
import sys, warnings
warnings.simplefilter("ignore")
from finegrain.images import ImageLoadError, load_image_sized
paths = [line.rstrip("\n") for line in open(sys.argv[1], encoding="utf-8")]
start = int(sys.argv[2])
for i in range(start, len(paths)):
    try:
        img, (w, h) = load_image_sized(paths[i])
        ok = img.mode == "RGB" and img.width > 0 and img.height > 0 and w > 0 and h > 0
        status = "image" if ok else f"unhandled\tbad image {img.mode} {img.size}"
    except ImageLoadError as exc:
        status = "error\t" + str(exc).replace("\t", " ").replace("\n", " ")[:200]
    except BaseException as exc:  # the finding this script looks for
        status = f"unhandled\t{type(exc).__name__}: {str(exc)[:200]}".replace("\n", " ")
    sys.stdout.write(f"{i}\t{status}\n")
    sys.stdout.flush()
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def seed_files() -> list[tuple[str, bytes]]:
    """Small valid images in many formats and modes: (suffix, bytes)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = Image.fromarray(getattr(data, name)())
        img = img.resize((96, int(96 * img.height / img.width)))

        def save(suffix, im, fmt, **kw):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            out.append((suffix, buf.getvalue()))

        save(".jpg", img, "JPEG", quality=85)
        save(".jpg", img, "JPEG", quality=70, progressive=True)
        save(".jpg", img.convert("CMYK"), "JPEG")
        save(".jpg", img.convert("L"), "JPEG")
        save(".png", img, "PNG")
        save(".png", img.convert("RGBA"), "PNG")
        save(".png", img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
        save(".png", img.convert("L").convert("I;16"), "PNG")
        frames = [img.convert("P"), img.rotate(15).convert("P")]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
        out.append((".gif", buf.getvalue()))
        save(".bmp", img, "BMP")
        save(".tif", img, "TIFF", compression="tiff_lzw")
        save(".tif", img.convert("CMYK"), "TIFF")
        save(".webp", img, "WEBP")
    return out


def _set_size_fields(data: bytearray, rng: random.Random) -> None:
    """Overwrite the declared width/height of PNG, JPEG, GIF or BMP with random values."""
    w, h = rng.choice([0, 1, 65535, 2**31 - 1, rng.randint(1, 20000)]), rng.choice([0, 1, 65535, rng.randint(1, 20000)])
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        data[16:24] = struct.pack(">II", w & 0xFFFFFFFF, h & 0xFFFFFFFF)
    elif data[:2] == b"\xff\xd8":
        i = data.find(b"\xff\xc0")
        if i < 0:
            i = data.find(b"\xff\xc2")
        if i > 0 and len(data) > i + 9:
            data[i + 5:i + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    elif data[:3] == b"GIF" and len(data) > 10:
        data[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif data[:2] == b"BM" and len(data) > 26:
        data[18:26] = struct.pack("<ii", w % 2**31, (h % 2**31) * rng.choice([1, -1]))


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"\x00\x00\x00\x0cjP  ", b"8BPS", b"P6\n", b"\x00\x00\x01\x00", b"icns", b"DDS ", b"\x76\x2f\x31\x01"]


def mutate(seeds: list[tuple[str, bytes]], rng: random.Random) -> tuple[str, bytes]:
    """One generated file (suffix, bytes)."""
    suffix, data = rng.choice(seeds)
    buf = bytearray(data)
    kind = rng.random()
    if kind < 0.08:
        return suffix, bytes(buf)  # unchanged valid image
    if kind < 0.45:
        for _ in range(rng.randint(1, 30)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind < 0.55:
        pos = rng.randrange(len(buf))
        buf[pos:pos] = os.urandom(rng.randint(1, 500))
        del buf[rng.randrange(len(buf)):][: rng.randint(1, 500)]
    elif kind < 0.68:
        buf = buf[: rng.randint(0, len(buf))]
    elif kind < 0.76:
        _, other = rng.choice(seeds)
        cut = rng.randrange(len(buf))
        buf = buf[:cut] + bytearray(other[rng.randrange(len(other)):])
    elif kind < 0.88:
        _set_size_fields(buf, rng)
        if rng.random() < 0.5:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind < 0.96:
        buf = bytearray(rng.choice(MAGIC) + os.urandom(rng.randint(0, 3000)))
    else:
        buf = bytearray(os.urandom(rng.randint(0, 3000)))
    if rng.random() < 0.15:
        suffix = rng.choice(SUFFIXES)  # content and suffix disagree
    return suffix, bytes(buf)


def generate(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seeds = seed_files()
    paths = []
    for i in range(n):
        suffix, data = mutate(seeds, rng)
        path = folder / f"f{i:05d}{suffix}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def loader_phase(paths: list[Path], work: Path, stall_s: float = 120.0, log=print) -> dict:
    """Run every file through the loader in worker subprocesses (restarted after a crash)."""
    listing = work / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    outcomes = collections.Counter()
    reasons = collections.Counter()
    unhandled, crashes = [], []
    start, t0 = 0, time.monotonic()
    while start < len(paths):
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(listing), str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=_env(), text=True, bufsize=1)
        last = start - 1
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=stall_s):
                proc.kill()
                crashes.append({"file": str(paths[last + 1]), "why": f"no progress for {stall_s:g} s"})
                break
            line = proc.stdout.readline()
            if not line:
                break
            i, status, *detail = line.rstrip("\n").split("\t")
            last = int(i)
            outcomes[status] += 1
            if status == "error":
                reasons[detail[0].split(":")[0][:60] if detail else ""] += 1
            elif status == "unhandled":
                unhandled.append({"file": str(paths[last]), "error": detail[0] if detail else ""})
            if (last + 1) % 2000 == 0:
                log(f"loader: {last + 1} files, {dict(outcomes)}")
        proc.wait()
        sel.close()
        if last + 1 < len(paths) and not (crashes and crashes[-1]["file"] == str(paths[last + 1])):
            crashes.append({"file": str(paths[last + 1]), "why": f"worker exited with {proc.returncode}: "
                                                                   f"{proc.stderr.read()[-300:]}"})
        start = last + 2 if last + 1 < len(paths) else len(paths)
    return {"files": len(paths), "outcomes": dict(outcomes), "unhandled": unhandled, "crashes": crashes,
            "top_reasons": dict(reasons.most_common(12)), "seconds": round(time.monotonic() - t0, 1)}


def index_phase(folder: Path, work: Path, n: int) -> dict:
    """``finegrain index`` over the whole folder in a subprocess."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "finegrain.cli", "index", str(folder), "--index", str(work / "index"),
                           "--json"], capture_output=True, text=True, env=_env())
    out = {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
           "traceback": "Traceback" in proc.stderr or "Traceback" in proc.stdout}
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update({k: summary[k] for k in ("indexed", "unchanged", "failed", "images_per_s")})
        out["all_files_accounted"] = summary["indexed"] + summary["failed"] == n
    except (ValueError, IndexError, KeyError):
        out["stderr_tail"] = proc.stderr[-2000:]
        out["all_files_accounted"] = False
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-index", action="store_true", help="Only the loader phase.")
    parser.add_argument("--work", type=Path, default=None, help="Keep the generated files here (default: temporary).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="finegrain-fuzz-")
    work = args.work or Path(tmp)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    try:
        paths = generate(work / "files", args.files, args.seed)
        log(f"generated {len(paths)} files")
        result = {"files": len(paths), "seed": args.seed, "loader": loader_phase(paths, work, log=log)}
        if not args.skip_index:
            result["index"] = index_phase(work / "files", work, len(paths))
    finally:
        if args.work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ld = result["loader"]
    ok = not ld["unhandled"] and not ld["crashes"] and (
        args.skip_index or (result["index"]["returncode"] == 0 and not result["index"]["traceback"]
                            and result["index"]["all_files_accounted"]))
    result["ok"] = ok
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
