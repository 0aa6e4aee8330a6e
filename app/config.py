"""Typed settings of the review server: the only module that reads the environment.

Every field can be set by an environment variable with the prefix ``VALD_MD_`` (``VALD_MD_PORT=8080``,
``VALD_MD_DATA_DIR=/srv/vald-md``) or passed to :class:`Settings` directly (tests, ``vald-md serve``).
Values are validated when the object is built, i.e. at start-up: an unsafe or impossible value stops the
server with a message that quotes it and says what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL_DIR = REPO_ROOT / "model_weights" / "vald-md-mini"
"""Same folder as ``app.modelfolder.DEFAULT_MODEL_DIR`` (not imported: reading settings must not load torch)."""
EMBEDDED_LUNG_SEGMENTER_DIR = REPO_ROOT / "model_weights" / "lungs-unet"
"""Same folder as ``app.lungs.DEFAULT_SEGMENTER_DIR`` (not imported, for the same reason)."""
DEFAULT_LESION_CLASSIFIER_DIR = REPO_ROOT / "model_weights" / "lesion-classifier"
"""Where ``VALD_MD_LESION_CLASSIFIER`` points when unset (``vald-md train lesions`` output; may be absent)."""

_DEVICE = re.compile(r"^(cpu|cuda(:\d{1,2})?|mps)$")
_LOOPBACK_NAMES = {"localhost"}
_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})*\.?$|^\[[0-9a-f:.]{2,45}\]$")


class PacsServer(BaseModel):
    """One DICOMweb server (``app.pacs``), an item of ``VALD_MD_PACS_SERVERS`` (a JSON list).

    Attributes:
        name: short id shown to users and written to the audit trail, ``[a-z0-9-]{1,32}``.
        url: DICOMweb base URL (``https://pacs.example.org/dicom-web``); ``http://`` only on loopback unless
            ``allow_plain_http`` (credentials and images would cross the network in clear).
        auth: ``none``, ``basic`` (``username`` + the password in the environment variable ``secret_env``) or
            ``bearer`` (the token in ``secret_env``). Credentials are read from the environment only, never
            stored by VALD-MD, and are ``SecretStr`` (``**********`` in any repr or log).
        verify_tls: check the server's certificate (default on); ``ca_bundle``: a PEM file of extra CAs.
        timeout_s: connect and read timeout of each request, seconds, 1..300.
        max_instance_mb: largest instance opened (estimated from Rows × Columns × bits before download), 1..1024.
    """

    name: str = Field(pattern=r"^[a-z0-9-]{1,32}$")
    url: str
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    secret_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")
    verify_tls: bool = True
    ca_bundle: Path | None = None
    timeout_s: float = Field(default=20.0, ge=1.0, le=300.0)
    max_instance_mb: int = Field(default=128, ge=1, le=1024)
    allow_plain_http: bool = False
    secret: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _check(self) -> PacsServer:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"PACS server {self.name!r}: url {self.url!r} is not an http(s) URL")
        if parts.username or parts.password:  # it would be shown in messages and pages; say so without it
            raise ValueError(f"PACS server {self.name!r}: the url carries credentials; put the user in 'username' "
                             "and the password or token in the environment variable named by 'secret_env'")
        if parts.scheme == "http" and not self.allow_plain_http and not _is_loopback(parts.hostname):
            raise ValueError(f"PACS server {self.name!r}: {self.url!r} is plain HTTP beyond this machine; use "
                             "https://, or set allow_plain_http only on a trusted network")
        if self.auth != "none":
            if not self.secret_env:
                raise ValueError(f"PACS server {self.name!r}: auth={self.auth!r} needs secret_env, the name of "
                                 "the environment variable that holds the password or token")
            if self.auth == "basic" and not self.username:
                raise ValueError(f"PACS server {self.name!r}: auth='basic' needs a username")
            value = os.environ.get(self.secret_env)
            if not value:
                raise ValueError(f"PACS server {self.name!r}: the environment variable {self.secret_env} is unset "
                                 "or empty")
            self.secret = SecretStr(value)
        return self


class Settings(BaseSettings):
    """Configuration of ``vald-md serve``.

    Attributes:
        model_dir: diffusers-format model folder; ``None`` = the embedded ``model_weights/vald-md-mini``.
        lung_segmenter: lung segmenter folder (``app.lungs``; ``VALD_MD_LUNG_SEGMENTER``); ``None`` = the embedded
            ``model_weights/lungs-unet``. A folder that is missing or not a segmenter is not an error: the server
            logs a warning and its maps are not restricted to the lungs (each record says so).
        lesion_classifier: lesion classifier folder (``app.lesions``; ``VALD_MD_LESION_CLASSIFIER``); ``None`` =
            ``model_weights/lesion-classifier``. The ``classifier_guided`` map method needs it (and the lung
            segmenter); a folder that is missing or not a classifier is not an error: the server logs a warning
            and offers only the SDEdit map.
        data_dir: folder for uploads and run artifacts (``<data_dir>/runs/<job_id>/``); created at start-up.
        host: interface to bind. Only loopback addresses are accepted unless ``allow_remote`` is set: the server
            speaks plain HTTP, so anything beyond this machine belongs behind a TLS-terminating reverse proxy.
        allow_remote: permit a non-loopback ``host`` (only behind a TLS-terminating reverse proxy).
        trusted_proxies: comma-separated IP addresses or CIDR networks of the reverse proxies whose
            ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (``VALD_MD_TRUSTED_PROXIES``), or ``*`` for any
            client (only when nothing but the proxy can reach the port); empty (the default) = the headers are
            ignored and the client address is the TCP peer's.
        trusted_hosts: comma-separated host names (``*.example.org`` patterns allowed) that requests may name in
            ``Host`` besides ``localhost``, ``127.0.0.1``, ``[::1]`` and ``host`` (``VALD_MD_TRUSTED_HOSTS``); any
            other name gets HTTP 400. Behind a proxy: the public name users type.
        port: TCP port, 1..65535.
        device: 'cpu', 'cuda', 'cuda:N', 'mps' or ``None`` (CUDA when available).
        dtype: 'fp32', 'fp16', 'bf16' or ``None`` (automatic per device).
        cpu_autocast: on a CPU with AMX or AVX-512 bf16 and fp32 weights, run the autoencoder under bf16 autocast
            (``VALD_MD_CPU_AUTOCAST``, default on; the UNet too for batches of 16 latents or more, e.g. 8 samples with
            guidance: 1.48x per step there; smaller batches stay float32). vald-md-mini, 256 px, one thread: VAE
            decode 455 -> 127 ms, encode 233 -> 68 ms; counterfactuals within 0.0006-0.0007 mean |difference| of
            float32 (docs/PERFORMANCE.md). ``false`` = bit-exact float32. Each record states it under ``compute``.
        compile_unet: compile the UNet with ``torch.compile`` at start-up and run short warm-up generations (the
            healthy preset's batch shape and one sample) before the server answers ``/readyz`` 200
            (``VALD_MD_COMPILE_UNET``, ``vald-md serve --compile``; default off). The compilation takes minutes and
            needs a C++ compiler (inductor): on 2 CPU cores 152 s with an empty cache, then the paper's request
            3.54 -> 2.66 s, a 16-sample request 6.07 -> 5.76 s (docs/PERFORMANCE.md).
        queue_size: jobs that may wait behind the running one, 1..64; further submissions get HTTP 503.
        max_jobs_per_user: runs one user may have queued or running at once, 1..64 (``VALD_MD_MAX_JOBS_PER_USER``);
            another gets HTTP 429. The worker takes the users' runs in turn (``app.jobs``).
        queue_cost_budget: total cost of the waiting runs in step-samples (``(int(steps * strength) + 1) *
            samples`` each), 100..10,000,000 (``VALD_MD_QUEUE_COST_BUDGET``); a run that would pass it gets HTTP
            503 (a run always fits an empty queue; an edited counterfactual counts one sample more). Default 12000:
            about three of the heaviest runs the default limits allow (250 steps at strength 1 x 16 samples = 4016;
            4267 with the edit).
        max_upload_mb: largest accepted request body in MiB (the image plus an optional mask), 1..1024.
        max_steps: largest ``steps`` a user may ask for, 1..1000 (bounds the time one job holds the model).
        max_samples: largest ``samples`` a user may ask for, 1..16.
        preview_size: longest side in pixels of the progress preview PNG, 32..512.
        thumbnail_size: longest side in pixels of history thumbnails, 32..256.
        sse_interval_s: at most one progress event per this many seconds per stream (state changes are sent at
            once), seconds, 0.05..5.
        database_url: SQLAlchemy URL of the accounts/audit database (``DATABASE_URL`` or ``VALD_MD_DATABASE_URL``),
            e.g. ``postgresql+psycopg://vald@db/vald``; ``None`` = SQLite at ``<data_dir>/vald-md.db``.
        cookie_secure: mark the session cookie ``Secure`` even when a request arrives over plain HTTP (set it
            behind a TLS-terminating proxy); requests that arrive over HTTPS get ``Secure`` regardless.
        session_idle_minutes: a session ends after this many minutes without a request, 1..1440.
        session_lifetime_hours: a session ends this many hours after login however active, 1..168.
        max_failed_logins: consecutive wrong passwords that lock an account, 1..100.
        lockout_minutes: how long a locked account stays locked, 1..1440.
        login_attempts_per_minute: login attempts allowed per client address and per username in any 60 s,
            1..1000; more get HTTP 429.
        store_plain_uids: also keep DICOM UIDs in clear in the database (``VALD_MD_STORE_PLAIN_UIDS=1``); by
            default only their HMAC under the secret file is stored.
        store_identified_uploads: keep uploaded DICOM files as received (``VALD_MD_STORE_IDENTIFIED_UPLOADS=1``);
            by default the stored copy is de-identified (``app.imaging.deid``, DICOM PS3.15 basic profile).
        audit_key: the audit chain's HMAC key ring as hex keys, comma-separated, the last one current
            (``VALD_MD_AUDIT_KEY``); ``None`` = the file ``audit_key_path`` (created on first start).
        audit_anchor_file: where the server appends a signed checkpoint of the audit chain at start-up and shut-down
            and ``vald-md audit anchor|verify --anchor`` look by default (``VALD_MD_AUDIT_ANCHOR_FILE``); ``None`` =
            ``<data_dir>/audit-anchors.jsonl``. For real protection, a path the database's owner cannot rewrite.
        api_token_days: how long a new API token works, days, 1..3650 (``VALD_MD_API_TOKEN_DAYS``).
        job_state: where the queue lives (``VALD_MD_JOB_STATE``): ``files`` (default: one process, jobs in memory and
            ``job.json``; unfinished jobs become ``interrupted`` at the next start) or ``database``: every accepted
            job is a row of the ``job`` table of ``database_url`` (PostgreSQL for several hosts), so that several
            front processes sharing that database and one ``data_dir`` volume see every job, each job runs once,
            the per-user limits and the queue's budget count across fronts, and a restart loses no accepted job
            (``app.jobs.jobtable``; docs/DEPLOYMENT.md "Several front processes").
        front_id: this process's name in the job table's ``claimed_by`` (``VALD_MD_FRONT_ID``, ``[A-Za-z0-9_.:-]``,
            at most 100 characters); ``None`` = host name, process id and a random suffix (a new one every start).
        job_heartbeat_s: database job state: how often a front renews the claim on its running job, and looks for
            other fronts' changes, seconds, 0.2..60.
        job_stale_after_s: database job state: a ``running`` job whose claim was not renewed for this many seconds
            belongs to a front that died; it is queued again once (its second attempt), then failed with a message,
            seconds, 5..3600 (keep it several heartbeats long).
        pacs_servers: DICOMweb servers users may search, open from and store back to (``VALD_MD_PACS_SERVERS``,
            a JSON list of :class:`PacsServer`); empty = no PACS page.
        pacs_original_study_roles: the roles that may store results back into the source's study with its patient
            data (``original-study``; ``VALD_MD_PACS_ORIGINAL_STUDY_ROLES``, comma-separated: ``admin`` (default)
            or ``admin,clinician``); everyone may store the de-identified kind.
        backend: where runs execute (``VALD_MD_BACKEND``): ``local`` (the default: one worker thread in this
            process on the model it loaded) or ``ray`` (a Ray Serve deployment of the model, :mod:`app.serving`;
            needs the ``ray`` extra, and ``data_dir`` on a volume every Ray node sees).
        ray_address: the Ray cluster to attach to (``VALD_MD_RAY_ADDRESS``, e.g. ``ray://head:10001`` or
            ``auto``); ``None`` = start a local one-machine cluster in this process.
        ray_replicas: replicas of the model deployment (``VALD_MD_RAY_REPLICAS``), 1..256; one per GPU when the
            cluster has GPUs (each replica then takes one), else each takes ``ray_cpus_per_replica`` CPUs.
        ray_min_replicas, ray_max_replicas: autoscaling bounds (``VALD_MD_RAY_MIN_REPLICAS`` /
            ``VALD_MD_RAY_MAX_REPLICAS``), 0..256 and 1..256; setting either turns autoscaling on (Serve adds a
            replica when runs wait, down to the minimum when idle), starting from ``ray_replicas``.
        ray_cpus_per_replica: logical CPUs each CPU replica reserves (``VALD_MD_RAY_CPUS_PER_REPLICA``),
            0.1..64; ``None`` = the cluster's CPUs shared among the replicas, at most 1.
    """

    model_config = SettingsConfigDict(env_prefix="VALD_MD_", extra="ignore", validate_default=True,
                                      populate_by_name=True)

    model_dir: Path | None = None
    lung_segmenter: Path | None = None
    lesion_classifier: Path | None = None
    data_dir: Path = REPO_ROOT / "data"
    host: str = "127.0.0.1"
    allow_remote: bool = False
    trusted_proxies: str = ""
    trusted_hosts: str = ""
    port: int = Field(default=8000, ge=1, le=65535)
    device: str | None = None
    dtype: str | None = None
    cpu_autocast: bool = True
    compile_unet: bool = False
    queue_size: int = Field(default=8, ge=1, le=64)
    max_jobs_per_user: int = Field(default=3, ge=1, le=64)
    queue_cost_budget: int = Field(default=12000, ge=100, le=10_000_000)
    max_upload_mb: int = Field(default=64, ge=1, le=1024)
    max_steps: int = Field(default=250, ge=1, le=1000)
    max_samples: int = Field(default=16, ge=1, le=16)
    preview_size: int = Field(default=192, ge=32, le=512)
    thumbnail_size: int = Field(default=96, ge=32, le=256)
    sse_interval_s: float = Field(default=0.25, ge=0.05, le=5.0)
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("VALD_MD_DATABASE_URL", "DATABASE_URL", "database_url"))
    cookie_secure: bool = False
    session_idle_minutes: int = Field(default=30, ge=1, le=1440)
    session_lifetime_hours: int = Field(default=12, ge=1, le=168)
    max_failed_logins: int = Field(default=5, ge=1, le=100)
    lockout_minutes: int = Field(default=15, ge=1, le=1440)
    login_attempts_per_minute: int = Field(default=10, ge=1, le=1000)
    store_plain_uids: bool = False
    store_identified_uploads: bool = False
    audit_key: SecretStr | None = None
    audit_anchor_file: Path | None = None
    api_token_days: int = Field(default=90, ge=1, le=3650)
    pacs_servers: list[PacsServer] = Field(default_factory=list)
    job_state: Literal["files", "database"] = "files"
    front_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    job_heartbeat_s: float = Field(default=2.0, ge=0.2, le=60.0)
    job_stale_after_s: float = Field(default=30.0, ge=5.0, le=3600.0)
    pacs_original_study_roles: str = "admin"
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_replicas: int = Field(default=1, ge=1, le=256)
    ray_min_replicas: int | None = Field(default=None, ge=0, le=256)
    ray_max_replicas: int | None = Field(default=None, ge=1, le=256)
    ray_cpus_per_replica: float | None = Field(default=None, ge=0.1, le=64)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str | None) -> str | None:
        if v in (None, "", "auto"):
            return None
        if not _DEVICE.match(v):
            raise ValueError(f"device={v!r} is not a device; use 'cpu', 'cuda', 'cuda:N', 'mps' or leave it unset")
        return v

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str | None) -> str | None:
        if v in (None, "", "auto"):
            return None
        if v not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"dtype={v!r} must be one of fp32, fp16, bf16 (or unset for automatic)")
        return v

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, v: Path) -> Path:
        p = v.expanduser().resolve()
        if p == Path(p.anchor) or p == Path.home().resolve():
            raise ValueError(f"data_dir={str(v)!r} is a filesystem root or home folder; use a dedicated folder")
        for served in (REPO_ROOT / "static", REPO_ROOT / "templates", REPO_ROOT / "app"):
            if p == served or served in p.parents:
                raise ValueError(f"data_dir={str(v)!r} lies inside {served.name}/, which is served or imported; "
                                 f"use a folder outside the source tree (default: data/)")
        return p

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+")):
            scheme = v.split(":", 1)[0]
            raise ValueError(f"database_url with scheme {scheme!r} is not supported; use sqlite:///PATH or "
                             f"postgresql+psycopg://USER@HOST/DB")
        return v

    @field_validator("model_dir", "lung_segmenter", "lesion_classifier", mode="before")
    @classmethod
    def _check_model_dir(cls, v: object) -> Path | None:
        # before validation: an empty VALD_MD_MODEL_DIR= means "unset", not Path("") == the working directory
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return Path(str(v)).expanduser().resolve()

    @field_validator("front_id", mode="before")
    @classmethod
    def _check_front_id(cls, v: object) -> object:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v  # empty = unset

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, v: str) -> str:
        entries = [e.strip() for e in v.split(",") if e.strip()]
        if entries == ["*"]:
            return "*"
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies entry {entry!r} is not an IP address or CIDR network; use e.g. "
                                 f"'127.0.0.1,10.0.0.0/8', or '*' alone") from None
        return ",".join(entries)

    @field_validator("trusted_hosts")
    @classmethod
    def _check_trusted_hosts(cls, v: str) -> str:
        entries = [e.strip().lower() for e in v.split(",") if e.strip()]
        for entry in entries:
            if not _HOST_NAME.match(entry):
                raise ValueError(f"trusted_hosts entry {entry!r} is not a host name; use names such as "
                                 f"'vald.example.org' or '*.example.org', an IPv4 address or '[IPv6]', no ports")
        return ",".join(entries)

    @field_validator("pacs_original_study_roles")
    @classmethod
    def _check_store_roles(cls, v: str) -> str:
        roles = [r.strip() for r in v.split(",") if r.strip()]
        if not roles or any(r not in ("admin", "clinician") for r in roles):
            raise ValueError(f"pacs_original_study_roles={v!r}: list the roles 'admin' and/or 'clinician', "
                             "comma-separated")
        return ",".join(roles)

    @field_validator("pacs_servers")
    @classmethod
    def _check_pacs_names(cls, v: list[PacsServer]) -> list[PacsServer]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"pacs_servers: names must be unique, got {names}")
        return v

    @field_validator("ray_address", mode="before")
    @classmethod
    def _check_ray_address(cls, v: object) -> str | None:
        return None if v is None or (isinstance(v, str) and not v.strip()) else str(v).strip()

    @model_validator(mode="after")
    def _check_ray_replicas(self) -> Settings:
        low, high = self.ray_replica_bounds
        if low > high:
            raise ValueError(f"ray_min_replicas={low} is above ray_max_replicas={high}; the minimum must not "
                             f"exceed the maximum")
        return self

    @model_validator(mode="after")
    def _check_job_timing(self) -> Settings:
        if self.job_stale_after_s < 3 * self.job_heartbeat_s:
            raise ValueError(f"job_stale_after_s={self.job_stale_after_s} must be at least 3 x job_heartbeat_s "
                             f"({self.job_heartbeat_s}): a live front's claim would look dead between heartbeats")
        return self

    @model_validator(mode="after")
    def _check_host(self) -> Settings:
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError(
                f"host={self.host!r} would expose the review server beyond this machine over plain HTTP; bind "
                f"127.0.0.1, or set VALD_MD_ALLOW_REMOTE=1 only behind a TLS-terminating reverse proxy")
        return self

    @property
    def trusted_proxy_list(self) -> list[str]:
        """``trusted_proxies`` as a list (empty: forwarded headers are ignored)."""
        return [e for e in self.trusted_proxies.split(",") if e]

    @property
    def allowed_hosts(self) -> list[str]:
        """The ``Host`` names served: the loopback names, the bind address (unless a wildcard), ``trusted_hosts``."""
        names = ["localhost", "127.0.0.1", "[::1]"]
        bind = f"[{self.host}]" if ":" in self.host else self.host.lower()
        if self.host not in ("0.0.0.0", "::"):
            names.append(bind)
        names += [e for e in self.trusted_hosts.split(",") if e]
        return list(dict.fromkeys(names))

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return self.max_upload_mb * 1024 * 1024

    @property
    def ray_autoscaling(self) -> bool:
        """Autoscaling bounds were set (``ray_min_replicas`` or ``ray_max_replicas``)."""
        return self.ray_min_replicas is not None or self.ray_max_replicas is not None

    @property
    def ray_replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas: both ``ray_replicas`` without autoscaling; else the bounds, each defaulting to
        ``ray_replicas``."""
        if not self.ray_autoscaling:
            return self.ray_replicas, self.ray_replicas
        low = self.ray_min_replicas if self.ray_min_replicas is not None else min(self.ray_replicas,
                                                                                 self.ray_max_replicas or 256)
        high = self.ray_max_replicas if self.ray_max_replicas is not None else max(self.ray_replicas, low)
        return low, high

    @property
    def runs_dir(self) -> Path:
        """Folder holding one sub-folder per job: ``<data_dir>/runs``."""
        return self.data_dir / "runs"

    @property
    def resolved_database_url(self) -> str:
        """``database_url``, or SQLite at ``<data_dir>/vald-md.db`` when unset."""
        return self.database_url or f"sqlite:///{self.data_dir / 'vald-md.db'}"

    @property
    def uid_secret_path(self) -> Path:
        """The HMAC key for DICOM UIDs and CSRF tokens: ``<data_dir>/secrets/uid-hmac.key`` (never in the database)."""
        return self.data_dir / "secrets" / "uid-hmac.key"

    @property
    def audit_key_path(self) -> Path:
        """The audit chain's HMAC key ring: ``<data_dir>/secrets/audit-hmac.key`` (unless ``VALD_MD_AUDIT_KEY``)."""
        return self.data_dir / "secrets" / "audit-hmac.key"

    @property
    def resolved_audit_anchor_file(self) -> Path:
        """``audit_anchor_file``, or ``<data_dir>/audit-anchors.jsonl`` when unset."""
        return (self.audit_anchor_file or self.data_dir / "audit-anchors.jsonl").expanduser()

    @property
    def resolved_model_dir(self) -> Path:
        """``model_dir``, or the embedded model folder when unset."""
        return self.model_dir or EMBEDDED_MODEL_DIR

    @property
    def resolved_lung_segmenter(self) -> Path:
        """``lung_segmenter``, or the embedded segmenter folder when unset."""
        return self.lung_segmenter or EMBEDDED_LUNG_SEGMENTER_DIR

    @property
    def resolved_lesion_classifier(self) -> Path:
        """``lesion_classifier``, or ``model_weights/lesion-classifier`` when unset."""
        return self.lesion_classifier or DEFAULT_LESION_CLASSIFIER_DIR


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
