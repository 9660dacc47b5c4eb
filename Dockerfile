# Production image: slim Python, non-root, migrations then uvicorn (CONSENT_WORKERS processes).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CONSENT_HOST=0.0.0.0 \
    CONSENT_PORT=8000 \
    CONSENT_WORKERS=2 \
    CONSENT_DEMO=false \
    CONSENT_DATA_DIR=/data \
    CONSENT_MIGRATIONS_DIR=/app/migrations

WORKDIR /app
COPY pyproject.toml README.md ./
COPY consent ./consent
COPY migrations ./migrations
COPY client-snippet/dist ./client-snippet/dist
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin consent \
    && mkdir -p /data && chown consent /data

USER consent
EXPOSE 8000
# Ready = database reachable and migrations at head (python: the slim image has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CONSENT_PORT', '8000'), timeout=4)" || exit 1
# `consent serve` applies migrations, then runs uvicorn with CONSENT_WORKERS workers.
# Point CONSENT_DATABASE_URL at PostgreSQL in production (postgresql+psycopg://user:pass@host/db).
CMD ["consent", "serve"]
