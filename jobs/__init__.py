"""Job specs, planning, the `repscope` CLI, results stores and reports."""

__version__ = "0.1.0"
