"""inspector: industrial visual inspection (MuSc, AnomalyCLIP, GraphCore on one shared backbone)."""

import os as _os

# OpenCV reads its decoder pixel cap once, when it loads: set it before any submodule imports cv2
# (the header check in inspector.io is the first line; this is the second).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", _os.environ.get("INSPECTOR_MAX_PIXELS", "50000000"))

__version__ = "0.1.0"
