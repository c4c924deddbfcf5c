"""pneumo: an AI worker beside a PACS that reads chest X-rays for pneumonia.

Packages and the one direction their imports flow::

    pneumo (settings, CLI, the Celery app)  ->  worker  ->  dicom_io, model, db

``dicom_io`` and ``model`` know nothing of Celery or the database.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
