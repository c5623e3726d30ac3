"""The ``modalign`` command line (``modalign.cli.main:main``)."""
