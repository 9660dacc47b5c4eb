"""The Docker image's steps without Docker: build the wheel, install it with the pinned
constraints into a clean venv, and run it from an unrelated directory against PostgreSQL (a
database this run creates and drops) with no path settings: it migrates, serves /snippet.js,
answers /readyz and a check."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import BACKENDS, SECRET_KEYS, create_run_database, free_port
from .helpers import ADMIN, ADMIN_TOKEN

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]} {done.stderr[-3000:]}"
    return done.stdout + done.stderr


def dockerfile_copies() -> list[str]:
    """The sources of the Dockerfile's COPY lines."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert "consent" in sources and "constraints.txt" in sources
    return sources


def test_wheel_installs_and_serves_from_anywhere(tmp_path: Path) -> None:
    if "postgresql" not in BACKENDS:
        pytest.skip("needs PostgreSQL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSENT_", "PROMETHEUS_", "VIRTUAL_ENV"))}
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    # the Docker build context: exactly what the Dockerfile's COPY lines take, links kept (the
    # wheel is built there, not in the clone)
    context = tmp_path / "context"
    for name in dockerfile_copies():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, context / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, context / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, context, cwd=elsewhere, env=env)
    wheel = next(wheels.glob("consent_service-*.whl"))
    run(sys.executable, "-m", "venv", venv, cwd=elsewhere, env=env)
    run(venv / "bin" / "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel, cwd=elsewhere, env=env)

    url = create_run_database("_deploy")
    env = {**env, "CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN, "CONSENT_DEMO": "false",
           "CONSENT_SECRET_KEYS": SECRET_KEYS}
    out = run(venv / "bin" / "consent", "migrate", cwd=elsewhere, env=env)
    assert "database at revision" in out
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([venv / "bin" / "consent", "serve", "--port", str(port)], cwd=elsewhere, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=10) as http:
            js = http.get("/snippet.js")
            assert js.status_code == 200
            assert js.content == (ROOT / "client-snippet" / "dist" / "snippet.js").read_bytes()
            css = http.get("/snippet.css")
            assert css.status_code == 200
            assert css.content == (ROOT / "client-snippet" / "dist" / "snippet.css").read_bytes()
            # the pages' templates and assets ship in the wheel too
            assert http.get("/", headers={"Accept": "text/html"}).status_code == 200
            assert http.get("/dashboard/sign-in").status_code == 200
            assert http.get("/static/dashboard.css").status_code == 200
            r = http.post("/v1/tenants", headers=ADMIN, json={"name": "Deployed"})
            assert r.status_code == 201, r.text
            sk = {"Authorization": f"Bearer {r.json()['keys']['secret_key']}"}
            assert http.put("/v1/purposes/marketing_email", headers=sk, json={"title": "News"}).status_code == 201
            c = http.get("/v1/check", headers=sk, params={"purpose": "marketing_email", "email": "a@example.com"})
            assert c.status_code == 200 and c.json()["status"] == "none"
        assert not any(elsewhere.iterdir())  # nothing written where it was started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_dockerfile_installs_pinned_dependencies_before_the_code() -> None:
    steps = [line.split()[0:2] for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith(("COPY", "RUN"))]
    flat = [" ".join(s) for s in steps]
    assert flat.index("COPY constraints.txt") < flat.index("RUN pip") < flat.index("COPY consent")
    text = (ROOT / "Dockerfile").read_text()
    assert "CONSENT_MIGRATIONS_DIR" not in text and "CONSENT_SNIPPET_PATH" not in text


def test_constraints_pin_every_dependency() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in
              (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    names = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert names <= pinned, names - pinned


def test_compose_runs_two_replicas_behind_one_trusted_proxy() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    apps = [s for s in services.values() if s.get("build") == "." and "command" not in s]
    assert len(apps) == 2 and "db" in services
    proxy = services["proxy"]
    assert proxy["ports"] == ["8000:8000"]
    address = proxy["networks"]["backend"]["ipv4_address"]
    for app in apps:
        env = app["environment"]
        assert env["CONSENT_TRUSTED_PROXIES"] == address
        assert env["CONSENT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["CONSENT_MIGRATE_ON_START"] == "false"
        assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["consent", "migrate"]
    nginx = compose["configs"]["nginx"]["content"]
    assert "server app1:8000" in nginx and "server app2:8000" in nginx
