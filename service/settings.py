"""The service's one settings object: every knob, typed, from flags or the environment, checked at start-up."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.scheduler import Batching, Padding, check_bucket_bounds

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class Settings(BaseSettings):
    """Service settings; environment variables are the field names upper-cased with a CLASSIFIER_ prefix."""

    model_config = SettingsConfigDict(env_prefix="CLASSIFIER_", extra="ignore")

    model: str | None = Field(
        None,
        validation_alias=AliasChoices("CLASSIFIER_MODEL", "MODEL", "model"),
        description="Local Hugging Face checkpoint directory or hub id; unset = the embedded default model.",
    )
    cache_dir: str | None = Field(None, description="Where the default model is built and kept.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Precision = Field(
        "auto",
        description="auto = the fastest precision measured at start-up whose scores stay within precision_tolerance "
        "of fp32's (fp32 for regression heads; with tune off: fp16 on CUDA, fp32 elsewhere).",
    )
    precision_tolerance: float = Field(0.01, ge=0, le=1, description="Largest score difference from fp32 on the calibration set that auto accepts.")
    tune: bool = Field(True, description="Measure precision and token budget at start-up; false = fixed per-device defaults.")
    tuning_time_limit: float = Field(
        20.0,
        gt=0,
        description="How long start-up tuning may take, however busy the machine: no trial starts that would end after "
        "90% of it (the budget ladder stops climbing at 75%).",
    )
    max_length: int | None = Field(None, ge=2, description="Longest input in tokens; unset = the model's own limit.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset = all cores.")
    trace_model: bool = Field(
        True,
        description="On a CPU, run the model as a TorchScript trace, checked at start-up against the model run operator "
        "by operator (used where the trace fails or differs): the forward pass then takes the interpreter lock once, "
        "not around every operator, so the service's other threads do not slow it.",
    )

    max_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Token budget per batch (texts x padded length); auto = measured at start-up (a per-device default with tune off).",
    )
    max_batch_size: int = Field(128, ge=1, description="Most texts in one batch; 1 turns batching off.")
    batch_window_ms: float = Field(4.0, ge=0, description="Longest a text waits for its batch to fill.")
    bucket_bounds: list[int] | None = Field(None, description="Ascending upper token bounds of the length buckets; unset = derived from max length.")
    merge_min_efficiency: float = Field(
        0.9, gt=0, le=1, description="A batch takes texts from neighbouring buckets while its padding efficiency stays this high."
    )
    padding: Padding = Field(
        "dynamic",
        description="dynamic = each batch padded to its own longest text; fixed = every batch padded to the maximum "
        "length (the classic strategy, kept for comparison).",
    )
    batching: Batching = Field(
        "buckets",
        description="buckets = texts of similar length batched together; arrival = batches in arrival order, no buckets (kept for comparison).",
    )
    max_queue_tokens: int = Field(1_000_000, ge=1, description="Admission stops (429 with Retry-After) when the queued tokens would exceed this.")
    request_timeout_ms: float = Field(
        10_000,
        gt=0,
        description="Deadline of a request that sets none: texts still queued then are dropped (504), and a request "
        "the queue is not predicted to reach by then is refused at once (429).",
    )
    tokenizer_workers: int = Field(
        2, ge=1, description="Threads tokenizing requests, each with its own tokenizer, so a big request holds up no other."
    )

    # Native memory (service/memory.py): what the process keeps after a burst.
    onednn_primitive_cache_capacity: int = Field(
        64,
        ge=0,
        description="Compiled oneDNN primitives kept (CPU bf16 matmuls, one per batch shape, ~180 KB each); "
        "oneDNN's own default of 1024 held ~180 MiB once full.",
    )
    torch_primitive_cache_capacity: int = Field(
        256,
        ge=1,
        description="oneDNN primitives PyTorch keeps in its own cache in front of oneDNN's (ideep's LRU_CACHE_CAPACITY; "
        "its default of 1024 grew the heap ~100 MiB under varied batch shapes; 0 crashes PyTorch).",
    )
    idle_heap_trim_seconds: float = Field(1.0, ge=0, description="After this long without requests, free heap pages go back to the OS; 0 = never.")

    workers: int | None = Field(
        None,
        ge=1,
        description="API processes (HTTP, validation, tokenization) in front of one engine process that owns the queue "
        "and the device; 1 = one process, as before; unset = 1 on a CPU (inference needs the cores), up to 4 on CUDA.",
    )

    max_texts_per_request: int = Field(256, ge=1)
    max_request_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    log_level: str = "info"

    # Connection limits and shutdown: how long a slow or stalled client may hold the server, and how SIGTERM ends.
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest a client may take to send a request's line and headers (then 408, closed)."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest a client may take to send a request's body once its headers arrived (then 408)."
    )
    max_concurrent_requests: int = Field(512, ge=1, description="Requests handled at once; more are answered 429 with Retry-After (probes exempt).")
    drain_delay_seconds: float = Field(5.0, ge=0, description="After SIGTERM, /ready answers 503 this long while requests are still served.")
    shutdown_grace_seconds: float = Field(
        60.0, gt=0, description="SIGTERM to exit, at most: after it the process exits 1 even with texts unanswered."
    )

    # Who may call: API keys and browsers' origins.
    api_keys: SecretStr | None = Field(
        None,
        description="Bearer keys that /classify and /predict require (401 without one): a file with one key a line "
        "(# comments allowed), or a comma-separated list; unset = open. Kept secret: never logged or shown.",
    )
    metrics_require_key: bool = Field(False, description="With api_keys set, /metrics requires a key too.")
    cors_allow_origins: str | None = Field(
        None,
        description="Comma-separated origins browsers may call from (CORS), or *; unset = no CORS headers (off).",
    )

    # Hostile clients (service/server.py, service/api.py): how much of a request is read before it is parsed, and
    # which Host headers are answered.
    max_request_line_bytes: int = Field(
        8192,
        ge=256,
        description="Longest request line (method, URL, version) in bytes; longer is answered 414 and closed as it arrives, before it is parsed.",
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="Most bytes of a request's line and headers together; more is answered 431 and closed as it arrives, before it is parsed.",
    )
    max_header_count: int = Field(100, ge=8, description="Most header lines in one request; more is answered 431.")
    trusted_hosts: str = Field(
        "*",
        description="Comma-separated host names the Host header may name (a leading *. matches any subdomain), or * "
        "for any; another is answered 400. /health, /ready and /metrics answer any Host (probes and scrapers use "
        "the pod's address); a request without Host is always 400.",
    )
    # Fair share between callers (service/fairness.py): who a caller is, and how far past a limit those under their
    # share may go once the callers over theirs are refused.
    fair_share_headroom: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Once the queue (max_queue_tokens) or the request slots (max_concurrent_requests) are full, callers "
        "over their fair share (the limit divided by the active callers) are refused (429) and callers under it may "
        "still use this fraction of the limit beyond it; 0 = a full limit refuses everyone.",
    )
    shared_batch_ms: float = Field(
        50.0,
        ge=0,
        description="While more than one caller has texts queued or sent some in the last 5 s, a batch holds at most the tokens the "
        "model runs in this long (at its measured rate; always at least one text), so a caller's text "
        "waits behind another's full batches only briefly; 0 = batches as large as with one caller.",
    )
    client_id_header: str = Field(
        "X-Client-Id",
        min_length=1,
        description="Header naming the caller when API keys are off (else its peer address names it).",
    )
    client_id_max_length: int = Field(64, ge=1, le=1024, description="Longest client id kept from that header (characters); longer ones are cut.")

    def api_key_list(self) -> list[bytes]:
        """The accepted keys (none when api_keys is unset): the file's lines, or the list's items."""
        if self.api_keys is None:
            return []
        value = self.api_keys.get_secret_value().strip()
        path = Path(value)
        lines = path.read_text().splitlines() if "," not in value and path.is_file() else value.split(",")
        return [key.encode() for line in lines if (key := line.strip()) and not key.startswith("#")]

    def trusted_host_list(self) -> list[str] | None:
        """The trusted host patterns, lower-case; None when any host is trusted."""
        hosts = [host.strip().lower() for host in self.trusted_hosts.split(",") if host.strip()]
        return None if "*" in hosts else hosts

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in (self.cors_allow_origins or "").split(",") if origin.strip()]

    @model_validator(mode="after")
    def _check_api_keys(self) -> "Settings":
        if self.api_keys is not None and not self.api_key_list():
            raise ValueError("api_keys names no key: give a file with one key a line, or a comma-separated list")
        return self

    @model_validator(mode="after")
    def _check_bucket_bounds(self) -> "Settings":
        if self.bucket_bounds is not None:
            check_bucket_bounds(self.bucket_bounds)
        return self

    @model_validator(mode="after")
    def _check_request_limits(self) -> "Settings":
        if self.max_request_line_bytes > self.max_header_bytes:
            raise ValueError("max_request_line_bytes must not exceed max_header_bytes, which counts the request line too")
        hosts = self.trusted_host_list()
        if hosts == []:
            raise ValueError("trusted_hosts names no host: give host names, or * for any")
        for host in hosts or []:
            # A port is not part of the match (the Host header's port is ignored); an IPv6 address comes in brackets.
            if "*" in host.removeprefix("*.") or (":" in host and not host.startswith("[")):
                raise ValueError(f"trusted_hosts: {host!r} is not a host name (without a port), *.domain or *")
        return self

    @model_validator(mode="after")
    def _check_shutdown_times(self) -> "Settings":
        if self.drain_delay_seconds >= self.shutdown_grace_seconds:
            raise ValueError("drain_delay_seconds must be shorter than shutdown_grace_seconds, to leave time to drain")
        return self
