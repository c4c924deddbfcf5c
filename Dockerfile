# One image for every pneumo role (listener, worker, API, migrations); the command picks the role.
#
# Two stages: the builder installs pneumo and its dependencies into a virtual
# environment; the runtime stage copies only that environment onto a clean base
# (no pip cache, no build tools) and runs as the unprivileged user "pneumo".
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pneumo ./pneumo
COPY dicom_io ./dicom_io
COPY model ./model
COPY db ./db
COPY worker ./worker
# Not editable: the packages (and the model weights, as package data) land in the venv.
RUN pip install --upgrade pip && pip install .


FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PNEUMO_DATA_DIR=/data

# A fixed uid, so a shared /data across hosts has one owner; the spool is private (0700).
RUN groupadd --system --gid 10001 pneumo \
    && useradd --system --uid 10001 --gid pneumo --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin pneumo \
    && mkdir -p /data \
    && chown pneumo:pneumo /data \
    && chmod 0700 /data

COPY --from=builder /opt/venv /opt/venv

USER pneumo
WORKDIR /data
VOLUME ["/data"]
# DICOM listener, staff API.
EXPOSE 11112 8000
CMD ["pneumo", "listen"]
