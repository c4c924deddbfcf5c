"""The staff face of pneumo: REST API, FHIR reports and the worklist page (FastAPI).

A thin layer over :mod:`db.queries` (the one search) and :mod:`db.access`
(tokens, audit, feedback); ``create_app(settings)`` in :mod:`pneumo.api.app`
builds it, ``pneumo api`` serves it.
"""

__all__: list[str] = []  # the modules are the API: app, auth, studies, pages, images
