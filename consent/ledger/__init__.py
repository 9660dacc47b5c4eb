"""The ledger: tenants, the catalog, records and their hash chains, checks, receipts and the change feed."""
