"""A small station with two registered products for the line tests (tiny CNN, 64 px: seconds)."""

from __future__ import annotations

import numpy as np


def make_station(tmp_path, names=("pa", "pb")):
    from skimage import data

    from inspector.station.service import StationService

    station = StationService(tmp_path / "data")
    g = data.brick()
    rgb = np.repeat(g[..., None], 3, axis=2)
    gen = np.random.default_rng(0)
    for name in names:
        crops = []
        for _ in range(2):
            y, x = gen.integers(0, rgb.shape[0] - 96, 2)
            crops.append(np.ascontiguousarray(rgb[y:y + 96, x:x + 96]))
        station.registry.register(name, crops, detector="patchcore", backbone="tiny-cnn", image_size=64,
                                  n_synthetic=1)
    return station
