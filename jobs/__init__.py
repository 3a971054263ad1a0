"""Job specs, planning, the pipeline, the `repscope` CLI, results stores and reports."""
