"""The ``consent`` command line."""
