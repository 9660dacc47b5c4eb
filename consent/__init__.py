"""Consent ledger service: records consent decisions and hands out signed receipts."""

__version__ = "0.1.0"
