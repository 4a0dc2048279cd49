"""inspector: industrial visual inspection (MuSc, AnomalyCLIP, GraphCore on one shared backbone)."""

__version__ = "0.1.0"
