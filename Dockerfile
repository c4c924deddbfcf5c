# One image for every pneumo role (listener, worker, migrations); the command picks the role.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PNEUMO_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pneumo ./pneumo
COPY dicom_io ./dicom_io
COPY model ./model
COPY db ./db
COPY worker ./worker
RUN pip install --no-cache-dir . \
    && useradd --system --uid 1000 --home-dir /data pneumo \
    && mkdir -p /data && chown pneumo /data

USER pneumo
VOLUME ["/data"]
EXPOSE 11112
CMD ["pneumo", "listen"]
