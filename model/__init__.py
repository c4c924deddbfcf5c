"""The pneumonia CNN: preprocessing, network, training, calibration, OOD guard, inference.

Must not import celery, sqlalchemy, ``db``, ``worker``, ``pneumo`` or ``dicom_io``:
DICOM pixels arrive as float [0, 1] arrays that ``dicom_io.pixels`` produced.
"""
