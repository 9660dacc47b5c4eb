"""Audit: verifiable exports, their verifier, the transparency log and retention."""
