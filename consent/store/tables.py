"""Every table of ``models``, typed as ``sa.Table``, under one name each: the statements
written in SQLAlchemy Core import them from here (a model's ``__table__`` is not typed)."""

from __future__ import annotations

from typing import cast

import sqlalchemy as sa

from consent.store import models


def _table(model: type) -> sa.Table:
    return cast(sa.Table, model.__table__)  # type: ignore[attr-defined]


TENANT = _table(models.Tenant)
API_KEY = _table(models.ApiKey)
ADMIN_TOKEN = _table(models.AdminToken)
SIGNING_KEY = _table(models.SigningKey)
PURPOSE = _table(models.Purpose)
COOKIE = _table(models.Cookie)
POLICY_VERSION = _table(models.PolicyVersion)
POLICY_PURPOSE = _table(models.PolicyPurpose)
SUBJECT = _table(models.Subject)
SUBJECT_IDENTIFIER = _table(models.SubjectIdentifier)
RECORD = _table(models.ConsentRecord)
STATE = _table(models.ConsentState)
RATE_LIMIT_COUNTER = _table(models.RateLimitCounter)
SUBJECT_TOKEN_KEY = _table(models.SubjectTokenKey)
EXPORT_MANIFEST = _table(models.ExportManifest)
EMAIL_LINK_SECRET = _table(models.EmailLinkSecret)
EVENT_COUNTER = _table(models.EventCounter)
EVENT = _table(models.Event)
WEBHOOK_ENDPOINT = _table(models.WebhookEndpoint)
WEBHOOK_DELIVERY = _table(models.WebhookDelivery)
WEBHOOK_ATTEMPT = _table(models.WebhookAttempt)
TENANT_AUDIT = _table(models.TenantAudit)
TLOG_LEAF = _table(models.TlogLeaf)
TLOG_NODE = _table(models.TlogNode)
TLOG_STATE = _table(models.TlogState)
TLOG_CHECKPOINT = _table(models.TlogCheckpoint)
DASHBOARD_USER = _table(models.DashboardUser)
DASHBOARD_SESSION = _table(models.DashboardSession)
DASHBOARD_ROLLUP = _table(models.DashboardRollup)
SNIPPET_SETTINGS = _table(models.SnippetSettings)
