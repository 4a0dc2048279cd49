"""Hostile-input probes, measured: what each costs now (issue 16).

    .venv/bin/python bench/hostile.py          # ~1 min on 2 CPU cores

* **Bombs**: for each accepted format a sub-8-KB file whose header claims a huge image (the very
  files of ``tests/test_hostile.py``); each is read in a fresh subprocess through
  ``inspector.io.read_image`` and the batch's ``load_file``; reported: claimed size, what the
  decoded image would take, the refusal, and the subprocess's peak-RSS growth
  (VmHWM after resetting it: ``ru_maxrss`` would carry over the parent's peak). For contrast, the old path without the header check (stock OpenCV
  cap, ``cv2.imdecode`` + the BGR->RGB conversion ``read_image`` applied) on a JPEG bomb scaled
  down to 8000x8000 pixels, so the probe itself stays affordable on a shared machine.
* **Batch**: ``inspector batch`` over 10 bombs (two per format) + 1 good image vs over the good
  image alone, peak RSS of each CLI process.
* **Login**: 12 wrong passwords for one user through :class:`inspector.security.passwords.LoginGuard` (the
  station's ``auth``): how many were checked before the lockout, time per scrypt check.

Writes ``bench/out/hostile.json`` and ``bench/HOSTILE.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

PEAK = "from inspector.eval.measure import peak_rss_kb as peak_kb, reset_peak_rss as reset_peak\n"

PROBE = r"""
import json, resource, sys, time
from pathlib import Path
from inspector import io as imio
from inspector.batch.common import load_file
path = Path(sys.argv[1])
before = reset_peak()
t0 = time.perf_counter()
try:
    imio.read_image(path); reason = None
except imio.ImageError as exc:
    reason = exc.reason
ms = (time.perf_counter() - t0) * 1e3
err = load_file(path).error
print(json.dumps({"reason": reason, "load_file": err, "ms": ms,
                  "rss_mb": (peak_kb() - before) / 1024}))
"""

UNGUARDED = r"""
import json, resource, sys
import cv2, numpy as np
before = reset_peak()
img = cv2.imdecode(np.fromfile(sys.argv[1], np.uint8), cv2.IMREAD_UNCHANGED)
if img is not None:  # what read_image did next (pages a lazy decoder left untouched get touched here)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
print(json.dumps({"shape": None if img is None else list(img.shape),
                  "rss_mb": (peak_kb() - before) / 1024}))
"""

BATCH = r"""
import resource, runpy, sys
sys.argv = ["inspector", *sys.argv[1:]]
try:
    runpy.run_module("inspector", run_name="__main__")
except SystemExit:
    pass
print("MAXRSS_KB", peak_kb())
"""


def _run(script: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PEAK + script, *args], capture_output=True, text=True, env=ENV, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bombs(tmp: Path) -> list[dict]:
    from test_hostile import BOMBS, SUFFIX, _claimed_size

    rows = []
    for fmt, make in sorted(BOMBS.items()):
        data = make()
        w, h = _claimed_size(data)
        p = tmp / f"bomb{SUFFIX[fmt]}"
        p.write_bytes(data)
        out = _run(PROBE, str(p))
        rows.append({"format": fmt, "bytes": len(data), "claimed": f"{w}x{h}", "decoded_mb": w * h * 3 / 2**20,
                     "refusal": out["reason"], "batch_refusal": out["load_file"], "ms": out["ms"],
                     "peak_rss_growth_mb": out["rss_mb"]})
    return rows


def unguarded(tmp: Path) -> dict:
    from test_hostile import bomb_jpeg

    p = tmp / "bomb8000.jpg"
    p.write_bytes(bomb_jpeg(8000, 8000))
    out = _run(UNGUARDED, str(p))
    return {"file_bytes": p.stat().st_size, "claimed": "8000x8000", **out}


def batch(tmp: Path) -> dict:
    import numpy as np
    from skimage import data as skdata
    from test_hostile import BOMBS, SUFFIX

    from inspector.io import write_image
    from inspector.station.service import StationService

    st = StationService(tmp / "data", device="cpu")
    g = skdata.brick()
    rgb = np.repeat(g[..., None], 3, axis=2)
    st.registry.register("brick", [rgb[:96, :96].copy(), rgb[100:196, 100:196].copy()], detector="patchcore",
                         backbone="tiny-cnn", image_size=64, n_synthetic=2)
    good, bad = tmp / "good", tmp / "bombs"
    for d in (good, bad):
        d.mkdir()
        write_image(d / "good.png", rgb[200:264, 200:264].copy())
    for fmt, make in BOMBS.items():
        for k in range(2):
            (bad / f"{fmt}{k}{SUFFIX[fmt]}").write_bytes(make())
    out = {}
    for name, d in (("good image only", good), ("10 bombs + the good image", bad)):
        res = subprocess.run([sys.executable, "-c", PEAK + BATCH, "batch", str(d), "--product", "brick", "--data-dir",
                              str(tmp / "data"), "--device", "cpu", "--no-progress", "--workers", "4"],
                             capture_output=True, text=True, env=ENV, timeout=300)
        kb = int(res.stdout.strip().splitlines()[-1].split()[1])
        out[name] = kb / 1024
    rows = [r for r in st.store.history(limit=None) if str(bad.resolve()) in r["source"]]
    out["bomb_rows_error"] = sum(r["verdict"] == "ERROR" for r in rows)
    out["rows"] = len(rows)
    return out


def login() -> dict:
    from inspector.security.passwords import LoginGuard, hash_password

    checked = []
    g = LoginGuard({"bob": hash_password("right")}, max_failures=5, lockout_s=300,
                   audit=lambda u, reason, d: checked.append(reason))
    t0 = time.perf_counter()
    answers = [g("bob", f"guess{i}") for i in range(12)]
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    g2 = LoginGuard({"x": hash_password("y")})
    g2("x", "y")
    check_ms = (time.perf_counter() - t1) * 1e3
    return {"attempts": 12, "accepted": sum(answers), "checked": checked.count("wrong password"),
            "refused_locked": checked.count("locked"), "elapsed_s": elapsed, "scrypt_check_ms": check_ms,
            "right_password_while_locked": g("bob", "right")}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as t:
        tmp = Path(t)
        res = {"bombs": bombs(tmp), "unguarded_cv2_jpeg": unguarded(tmp), "batch_peak_rss_mb": batch(tmp),
               "login": login()}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(res, indent=2))
    lines = ["# Hostile inputs (bench/hostile.py)", "",
             "Reproduce: `.venv/bin/python bench/hostile.py` (writes this file and `bench/out/hostile.json`).", "",
             "| format | file bytes | claimed | decoded would be | refusal (read_image) | peak RSS growth |",
             "|---|---|---|---|---|---|"]
    for r in res["bombs"]:
        lines.append(f"| {r['format']} | {r['bytes']} | {r['claimed']} | {r['decoded_mb']:.0f} MB | {r['refusal']} "
                     f"| {r['peak_rss_growth_mb']:.1f} MB |")
    u = res["unguarded_cv2_jpeg"]
    b = res["batch_peak_rss_mb"]
    lg = res["login"]
    lines += ["", f"Without the header check (stock OpenCV cap; `cv2.imdecode` + BGR->RGB as before) a {u['file_bytes']}-byte JPEG claiming "
              f"{u['claimed']}: decoded to {u['shape']}, peak RSS +{u['rss_mb']:.0f} MB.", "",
              f"`inspector batch` peak RSS: good image only {b['good image only']:.0f} MB; 10 bombs + the good image "
              f"{b['10 bombs + the good image']:.0f} MB ({b['bomb_rows_error']} of {b['rows']} rows ERROR).", "",
              f"Login: {lg['attempts']} wrong passwords in {lg['elapsed_s']:.2f} s, {lg['checked']} checked, "
              f"{lg['refused_locked']} refused by the lockout; the right password while locked: "
              f"{'accepted' if lg['right_password_while_locked'] else 'refused'}; one scrypt check "
              f"{lg['scrypt_check_ms']:.0f} ms.", ""]
    (ROOT / "bench" / "HOSTILE.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
