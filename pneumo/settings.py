"""The one typed settings object for the whole product.

Values come, highest priority first, from environment variables
(``PNEUMO_*``), an optional TOML file (``PNEUMO_CONFIG=path.toml``), and the
defaults below. With no configuration at all the product runs embedded on one
machine: SQLite database and a private ``redis-server`` as the Celery broker,
both under ``data_dir`` (:mod:`worker.embedded_broker`).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_io.config import (
    AllowedPeer,
    Destination,
    ListenerConfig,
    TLSConfig,
    validate_ae_title,
)
from model.precision import Precision
from worker import embedded_broker
from worker.config import WorkerConfig, WorkerPool

__all__ = ["Settings", "load_settings"]


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can configure. See the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="PNEUMO_", extra="ignore")

    # --- DICOM node -------------------------------------------------------
    ae_title: str = "PNEUMO"
    # Loopback unless asked: bound elsewhere, the listener needs ``allowed_aets``
    # (or "*" for any caller), as dicom_io.config.ListenerConfig enforces.
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(default=10, ge=1)
    # >1: that many processes receive on the port (dicom_io.receivers); up to one per core
    listener_processes: int = Field(default=1, ge=1, le=32)
    max_pdu: int = Field(default=0, ge=0, description="0 = unlimited")
    spool_reserve_mb: int = Field(default=500, ge=0)
    max_image_pixels_bits: int = Field(default=16384 * 16384 * 16, ge=1)
    study_quiet_seconds: float = Field(default=5.0, gt=0)
    study_release_grace_seconds: float = Field(default=1.0, ge=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    send_retries: int = Field(default=3, ge=0)
    send_backoff_seconds: float = Field(default=2.0, ge=0)
    # The PACS's Query/Retrieve SCP, AE@host:port: purged instance files are
    # fetched back from it when a study is reprocessed (dicom_io.retrieve).
    pacs: Destination | None = None
    retrieve_method: Literal["get", "move"] = "get"

    # --- staff API ---------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)

    # --- observability (pneumo.metrics, pneumo.logs) -------------------------
    log_format: Literal["text", "json"] = "text"
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="`pneumo listen` serves its counters on /metrics here (on `host`); 0 = off",
    )

    # --- storage and services --------------------------------------------
    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None

    # --- processing ------------------------------------------------------
    model_path: Path | None = None
    batch_size: int = Field(default=8, ge=1, description="images per forward pass")
    batch_window_ms: float = Field(
        default=10.0,
        ge=0,
        description="how long a forward pass waits for other studies' images; 0 = no batching",
    )
    task_time_limit_seconds: int = Field(default=600, ge=10)
    task_max_retries: int = Field(default=3, ge=0)
    task_retry_backoff_seconds: float = Field(default=5.0, ge=0)
    torch_threads: int = Field(
        default=0, ge=0, description="CPU threads per worker process; 0 = cores / processes"
    )
    inference_precision: Precision = Field(
        default=Precision.AUTO,
        description="what the forward pass computes in: auto (float32 on the CPU, float16 on "
        "CUDA), float32, float16 or bfloat16 (fast on CPUs with AVX512-BF16 or AMX; moves "
        "probabilities by a few thousandths); recorded in every result's SR",
    )
    worker_warmup: bool = True  # load the model when a worker process starts
    worker_pool: WorkerPool = Field(
        default=WorkerPool.PREFORK,
        description="prefork: a process per study, hard time limit enforced (default); "
        "threads: studies share one model and batch their images (GPU hosts)",
    )
    worker_threads: int = Field(
        default=4, ge=1, description="studies in flight in a threads-pool worker"
    )
    heatmap_max_side: int = Field(
        default=1024, ge=0, description="longest side of the heatmap SC; 0 = source size"
    )
    intended_max_age_years: int = Field(default=17, ge=0)

    # --- reliability: heartbeats and the reconciler (worker.heartbeat, worker.reconciler) ---
    heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    heartbeat_stale_seconds: float = Field(
        default=30.0, gt=0, description="a worker silent this long is presumed dead"
    )
    reconcile_interval_seconds: float = Field(
        default=5.0, ge=0, description="how often each worker looks for stale work; 0 = off"
    )
    reconcile_stale_seconds: float = Field(
        default=60.0,
        ge=0,
        description="age after which a queued study or unsent delivery is re-published",
    )
    delivery_max_attempts: int = Field(default=10, ge=1)
    fault_test_delay_seconds: float = Field(
        default=0.0, ge=0, description="fault tests only: sleep at the start of each attempt"
    )

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("inference_precision", mode="before")
    @classmethod
    def _parse_precision(cls, value: Any) -> Any:
        return Precision.parse(value)

    @field_validator("allowed_aets", mode="before")
    @classmethod
    def _split_aets(cls, value: Any) -> Any:
        # "AE" or "AE@address" (IP or CIDR network), normalised: PACS@10.1.0.0/16
        return [str(AllowedPeer.parse(v)) for v in _comma_list(value)]

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                return Destination.parse(value)
            except ValueError as exc:
                raise ValueError(f"PNEUMO_PACS: {exc}") from None
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _split_destinations(cls, value: Any) -> Any:
        items = _comma_list(value)
        return [Destination.parse(v) if isinstance(v, str) else v for v in items]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("PNEUMO_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    # --- derived locations ---------------------------------------------
    @cached_property
    def spool_dir(self) -> Path:
        """Where received instances are written before they are acknowledged."""
        return self.data_dir / "spool"

    @cached_property
    def results_dir(self) -> Path:
        """Where produced SR and Secondary Capture objects are kept."""
        return self.data_dir / "results"

    @property
    def effective_database_url(self) -> str:
        """The database URL; embedded SQLite under ``data_dir`` when none is set."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'pneumo.db').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker; the embedded Redis's Unix socket under ``data_dir`` when none is set."""
        return self.broker_url or embedded_broker.broker_url(self.data_dir)

    @property
    def embedded(self) -> bool:
        """True when neither a database nor a broker is configured (all under ``data_dir``)."""
        return self.database_url is None and self.broker_url is None

    @property
    def uses_embedded_broker(self) -> bool:
        """True when the broker is the private ``redis-server`` this product starts itself."""
        return self.broker_url is None

    def tls_config(self) -> TLSConfig | None:
        """DICOM TLS when a certificate and its key are configured, else None."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TLSConfig(
            cert_file=self.tls_cert,
            key_file=self.tls_key,
            ca_file=self.tls_ca,
            require_client_cert=self.tls_require_client_cert,
        )

    def listener_config(self) -> ListenerConfig:
        """The DICOM listener's configuration derived from these settings."""
        return ListenerConfig(
            spool_dir=self.spool_dir,
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            allowed_aets=frozenset(self.allowed_aets),
            max_associations=self.max_associations,
            max_pdu=self.max_pdu,
            spool_reserve_bytes=self.spool_reserve_mb * 1024 * 1024,
            study_quiet_seconds=self.study_quiet_seconds,
            study_release_grace_seconds=self.study_release_grace_seconds,
            tls=self.tls_config(),
            receiving_processes=self.listener_processes,
        )

    def worker_config(self) -> WorkerConfig:
        """The worker layer's configuration derived from these settings."""
        return WorkerConfig(
            database_url=self.effective_database_url,
            broker_url=self.effective_broker_url,
            data_dir=self.data_dir,
            results_dir=self.results_dir,
            ae_title=self.ae_title,
            destinations=tuple(self.destinations),
            tls=self.tls_config(),
            pacs=self.pacs,
            retrieve_method=self.retrieve_method,
            spool_dir=self.spool_dir,
            send_retries=self.send_retries,
            send_backoff_seconds=self.send_backoff_seconds,
            model_path=self.model_path,
            batch_size=self.batch_size,
            batch_window_ms=self.batch_window_ms,
            task_time_limit_seconds=self.task_time_limit_seconds,
            task_max_retries=self.task_max_retries,
            task_retry_backoff_seconds=self.task_retry_backoff_seconds,
            torch_threads=self.torch_threads,
            inference_precision=self.inference_precision,
            worker_warmup=self.worker_warmup,
            heatmap_max_side=self.heatmap_max_side,
            intended_max_age_years=self.intended_max_age_years,
            max_image_pixels_bits=self.max_image_pixels_bits,
            heartbeat_interval_seconds=self.heartbeat_interval_seconds,
            heartbeat_stale_seconds=self.heartbeat_stale_seconds,
            reconcile_interval_seconds=self.reconcile_interval_seconds,
            reconcile_stale_seconds=self.reconcile_stale_seconds,
            delivery_max_attempts=self.delivery_max_attempts,
            fault_test_delay_seconds=self.fault_test_delay_seconds,
        )


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and ``PNEUMO_CONFIG``), with overrides on top."""
    return Settings(**overrides)
