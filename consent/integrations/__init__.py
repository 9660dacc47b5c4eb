"""Integrations: webhooks, email links, notices, the snippet's server side and the consumer helpers."""
