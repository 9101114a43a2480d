"""Settings of the distributed run, all from the environment (ConfigMaps and Secrets on Kubernetes).

Processes of the distributed run and how they are started:

- gateway:          ``sparkle gateway --host 0.0.0.0 --port 8080``            (HTTP API, enqueues jobs)
- orchestrator:     ``sparkle worker --queues sparkle.cpu --pool threads --concurrency 16``
                    (sample journeys: stage functions, waiting on the model-service steps they send)
- model service X:  ``sparkle serve X --backend real ...`` (the model, HTTP on :8000) and, in the same pod,
                    ``sparkle worker --queues sparkle.X --service-url http://127.0.0.1:8000 --concurrency 1``
                    (consumes X's queue and calls the model server; KEDA scales on that queue)
- flower:           ``celery --app sparkle.orchestrator.celery_app flower --port 5555``
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DistributedSettings(BaseSettings):
    """``SPARKLE_*`` variables of the distributed run."""

    model_config = SettingsConfigDict(env_prefix="SPARKLE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and result backend (Redis)")
    store_url: str = Field("local:./data", description="artifact store: local:DIR or s3://BUCKET")
    s3_endpoint: str = Field("127.0.0.1:9000", description="MinIO / S3 endpoint host:port")
    s3_access_key: SecretStr = SecretStr("sparkle")
    s3_secret_key: SecretStr = SecretStr("sparkle-secret")
    s3_access_key_file: Path | None = Field(None, description="a file holding the access key (a mounted secret); "
                                            "read instead of s3_access_key when set")
    s3_secret_key_file: Path | None = Field(None, description="a file holding the secret key")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    gateway_api_keys: SecretStr | None = Field(None, description="comma-separated API keys of the gateway")
    gateway_rate_limit: str = Field("30/second", description="requests per client (API key, or address when "
                                    "the gateway is open), in the `limits` notation")
    gateway_max_streams: int = Field(4, ge=1, description="open event streams (SSE) per client")
    presign_max_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="longest expiry of an artifact link, s")
    serve_api_key: SecretStr | None = Field(None, description="the model server's API key, sent by its queue "
                                            "worker (the same SPARKLE_SERVE_API_KEY the server reads)")
    serve_api_key_file: Path | None = Field(None, description="a file holding it (SPARKLE_SERVE_API_KEY_FILE)")
    visibility_timeout_s: int = Field(7200, description="Redis visibility timeout: longer than the longest stage")
    unacked_restore_interval_s: int = Field(15, description="how often a killed worker's task is restored")
    max_upload_bytes: int = Field(2 * 1024**3, description="largest accepted upload (gateway)")
    bulk_window: int = Field(64, ge=1, description="samples in flight at once during bulk generation")
    manifest_root: str | None = Field(None, description="directory a dataset manifest's local paths must lie in "
                                      "(gateway and orchestrator workers; None: the gateway refuses local paths)")
    sample_lease_s: float = Field(20.0, gt=0, description="lease of a sample's Redis lock: a dead stage worker "
                                  "blocks its sample this long at most (renewed every third of it while alive)")
    stall_s: float = Field(15.0, gt=0, description="a journey with neither a queued nor a running message for this "
                           "long is sent again by the reaper (orchestrator/liveness.py)")
    reap_interval_s: float = Field(5.0, gt=0, description="how often the reaper looks for stalled journeys")
    queued_max_s: float = Field(900.0, gt=0, description="longest a queued message is trusted to be in its queue "
                                "before it is sent again (a duplicate is harmless; a lost message is not)")
    op_lease_s: float = Field(20.0, gt=0, description="lease of a running service call (renewed while alive)")
    op_check_s: float = Field(5.0, gt=0, description="how often a waiting stage checks that its call is alive")
    op_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles per retry, full jitter")
    op_backoff_max_s: float = Field(30.0, gt=0, description="longest retry delay, seconds")
    op_wait_s: float = Field(6 * 3600.0, gt=0, description="longest wait of a stage on one service call, queueing "
                             "and outages included: a service call is retried (503/504/connection errors) until "
                             "this long after it was first sent; then the sample fails")
    op_timeout_s: float = Field(1800.0, gt=0, description="HTTP time-out of one call to a model server")
    stage_max_retries: int = Field(5, ge=0, description="retries of a stage on store/broker errors")
    webhook_signing_key: SecretStr | None = Field(None, description="master key of the webhook signatures: each "
                                                  "API key's signing secret is derived from it (gateway and "
                                                  "orchestrator workers); unset: callback_url is refused")
    webhook_allow_link_local: bool = Field(False, description="let callback URLs reach link-local and cloud "
                                           "metadata addresses (169.254.0.0/16, fe80::/10, metadata hosts)")
    webhook_max_attempts: int = Field(10, ge=1, description="deliveries of one webhook event before giving up")
    webhook_backoff_s: float = Field(2.0, gt=0, description="first redelivery delay; doubles, full jitter")
    webhook_backoff_max_s: float = Field(600.0, gt=0, description="longest redelivery delay, seconds")
    webhook_timeout_s: float = Field(10.0, gt=0, description="HTTP time-out of one delivery, seconds")

    def webhook_key(self) -> str | None:
        """The webhook master signing key, or None when it is unset or empty (compose passes ``""``)."""
        key = self.webhook_signing_key.get_secret_value().strip() if self.webhook_signing_key else ""
        return key or None

    def s3_credentials(self) -> tuple[str, str]:
        """(access key, secret key): from the ``*_file`` settings when given, else the values. Raises ConfigError
        for a missing or empty file."""
        return (resolve_key(None, self.s3_access_key_file, "SPARKLE_S3_ACCESS_KEY_FILE") or
                self.s3_access_key.get_secret_value(),
                resolve_key(None, self.s3_secret_key_file, "SPARKLE_S3_SECRET_KEY_FILE") or
                self.s3_secret_key.get_secret_value())


def resolve_key(value: SecretStr | None, file: Path | None, what: str) -> str | None:
    """A secret given as a value or as a file (its stripped contents), or None when neither is. Raises
    ConfigError when the file is missing or empty."""
    from .errors import ConfigError

    if value is not None and value.get_secret_value().strip():
        return value.get_secret_value().strip()
    if file is None:
        return None
    try:
        text = Path(file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}={file}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{what}={file} is empty")
    return text
