# Production image: slim Python, non-root, migrations then uvicorn (CONSENT_WORKERS processes).
# The built wheel carries the migrations and the snippet: no path settings are needed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONSENT_HOST=0.0.0.0 \
    CONSENT_PORT=8000 \
    CONSENT_WORKERS=2 \
    CONSENT_DEMO=false \
    CONSENT_DATA_DIR=/data \
    # Nothing forwards from inside the container by default: the peer is the client. Behind a
    # proxy, name its address or network (docker-compose.yml does).
    CONSENT_TRUSTED_PROXIES=127.0.0.1

WORKDIR /src
# Dependencies first, pinned: this layer is rebuilt only when constraints.txt changes.
COPY constraints.txt ./
RUN pip install -r constraints.txt
# Then the code (consent/web/static/snippet.js and snippet.css link into the built snippet).
COPY pyproject.toml README.md LICENSE ./
COPY client-snippet/dist ./client-snippet/dist
COPY consent ./consent
RUN pip install --no-deps -c constraints.txt . \
    && rm -rf /src/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin consent \
    && mkdir -p /data && chown consent /data

WORKDIR /data
USER consent
EXPOSE 8000
# Ready = database reachable and migrations at head (python: the slim image has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CONSENT_PORT', '8000'), timeout=4)" || exit 1
# `consent serve` applies migrations, then runs uvicorn with CONSENT_WORKERS workers.
# Point CONSENT_DATABASE_URL at PostgreSQL in production (postgresql+psycopg://user:pass@host/db).
CMD ["consent", "serve"]
