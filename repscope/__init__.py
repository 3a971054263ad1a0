"""repscope: compare the internal representations of neural networks at scale.

The package maps the project's top-level folders into one namespace: ``repscope.store``
(activation stores), ``repscope.cluster`` (streaming statistics, metrics and their execution)
and ``repscope.jobs`` (specs, planning, the pipeline, results, the CLI).
"""

__version__ = "0.2.0"
