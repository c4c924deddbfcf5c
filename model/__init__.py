"""The pneumonia CNN: preprocessing, network, training, calibration, OOD guard, inference.

Must not import celery, sqlalchemy, ``db``, ``worker``, ``pneumo`` or ``dicom_io``:
DICOM pixels arrive as float [0, 1] arrays that ``dicom_io.pixels`` produced.
"""

# The public modules; import what you need from them (``from model.inference import ...``).
__all__ = [
    "adapt",
    "calibration",
    "card",
    "evaluation",
    "evaluation_sets",
    "images",
    "inference",
    "metrics",
    "monitoring",
    "network",
    "ood",
    "plots",
    "preprocess",
    "shift",
    "train",
    "training_data",
]
