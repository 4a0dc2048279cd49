"""Shared test set-up: offline, deterministic, small. Fixtures here are used across issues;
feature-specific fixtures live in their own test files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")

import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARTIFACTS = Path(__file__).parent / "artifacts"

# ---- deadlines -------------------------------------------------------------------------------
# Every wait in the tests is a wait on a condition, bounded by a deadline made here. The seconds a
# test passes are already generous for a machine at several times its core count in load (a
# deadline only costs time when the test is failing anyway); INSPECTOR_TEST_SLOWDOWN multiplies
# them all for slower or busier machines (`make test-busy` sets it). Sleeps that are the thing
# under test (a quiet window in which nothing may happen, a pace) need no scaling: load can only
# make such a window hold more easily, never fail it; they say so where they stand.
SLOWDOWN = float(os.environ.get("INSPECTOR_TEST_SLOWDOWN") or 1)
if not SLOWDOWN >= 1:
    raise ValueError(f"INSPECTOR_TEST_SLOWDOWN must be a number >= 1, not {SLOWDOWN!r}")


def deadline(seconds: float) -> float:
    """The time limit of a wait that takes well under ``seconds`` on a busy machine, scaled by
    INSPECTOR_TEST_SLOWDOWN. Use for every timeout a test gives (subprocess, join, client, queue)."""
    return seconds * SLOWDOWN


def timeout_mark(seconds: float):
    """``pytest.mark.timeout`` (pytest-timeout's hard stop for a hung test) at ``deadline(seconds)``:
    scaled like the waits it encloses, so it never fires before them."""
    return pytest.mark.timeout(deadline(seconds))


def wait_for(condition: Callable[[], object], timeout: float, what: str | Callable[[], str], step: float = 0.02):
    """Poll ``condition()`` every ``step`` s until it returns something truthy, and return that.
    Fails the test, saying ``what`` was awaited and for how long, when it is still falsy after
    ``deadline(timeout)`` s (``timeout`` is the unscaled figure, like ``deadline``'s argument).
    ``what`` may be a callable returning the message (e.g. to show the state at the time)."""
    limit = deadline(timeout)
    t0 = time.monotonic()
    while True:
        out = condition()
        if out:
            return out
        waited = time.monotonic() - t0
        if waited >= limit:
            msg = what() if callable(what) else what
            pytest.fail(f"timed out after {waited:.1f} s waiting for {msg} "
                        f"(deadline {timeout:g} s x INSPECTOR_TEST_SLOWDOWN {SLOWDOWN:g})")
        time.sleep(step)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def lite0():
    """The real offline backbone (EfficientNet-Lite0 ImageNet weights) on CPU at 128 px."""
    from inspector.backbones.registry import load_backbone

    return load_backbone("efficientnet-lite0", device="cpu", image_size=128)


@pytest.fixture(scope="session")
def tiny_cnn():
    from inspector.backbones.registry import load_backbone

    return load_backbone("tiny-cnn", device="cpu")


@pytest.fixture(scope="session")
def brick() -> np.ndarray:
    """scikit-image's brick texture as RGB uint8 (512x512)."""
    from skimage import data

    g = data.brick()
    return np.repeat(g[..., None], 3, axis=2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_crop(image: np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One ``size`` square crop of ``image`` at a position drawn from ``rng``."""
    y, x = rng.integers(0, image.shape[0] - size, 2)
    return np.ascontiguousarray(image[y:y + size, x:x + size])


def random_crops(image: np.ndarray, n: int, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """``n`` square crops of ``image`` at seeded random positions."""
    gen = np.random.default_rng(seed)
    return [random_crop(image, gen, size) for _ in range(n)]


def brick_station(tmp_path_factory, brick: np.ndarray, name: str):
    """A Station in a fresh ``name`` folder with one tiny product ``brick`` (PatchCore on the tiny
    CNN at 64 px, two 96 px brick crops): what the batch and hardening tests run against."""
    from inspector.station.service import StationService

    st = StationService(tmp_path_factory.mktemp(name) / "data", device="cpu")
    st.registry.register("brick", random_crops(brick, 2, 96, seed=0), detector="patchcore",
                         backbone="tiny-cnn", image_size=64, n_synthetic=2)
    return st


@pytest.fixture(scope="session")
def brick_crops(brick):
    """``brick_crops(n, size=96, seed=0)``: seeded random crops of the brick texture."""
    return lambda n, size=96, seed=0: random_crops(brick, n, size, seed)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread, here and in subprocesses (tests set OMP_NUM_THREADS=1 for those): tiny
    models gain nothing from more, and on a loaded machine OpenMP spin-waiting makes 2 threads
    10-100x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_after_rows(proc, watcher, batch_id: str, rows: int, timeout: float, *,
                    started: Callable[[], object] | None = None, start_timeout: float = 300) -> int:
    """SIGKILL a running batch process (``subprocess.Popen`` with stderr piped) once ``watcher``
    (a Store) counts ``rows`` results of ``batch_id``; returns the process's exit code. Fails the
    test if the batch ends first, or if ``rows`` rows take longer than ``timeout`` s (scaled by
    ``deadline``). ``started`` is the batch's own readiness signal where its start-up is long and
    load-dependent (Ray: its scoring actor is up): awaited first, for up to ``start_timeout`` s,
    and the ``timeout`` for the rows counts from then."""
    import signal

    def alive() -> bool:
        assert proc.poll() is None, f"batch ended before it could be killed: {proc.stderr.read()[-3000:]!r}"
        return True

    def count() -> int:
        return watcher.count(batch_id=batch_id)

    try:
        if started is not None:
            wait_for(lambda: alive() and (started() or count() >= rows), start_timeout,
                     "the batch to start (its readiness signal)")
        wait_for(lambda: alive() and count() >= rows, timeout,
                 lambda: f"{rows} rows of batch {batch_id} (saw {count()})")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=deadline(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode
