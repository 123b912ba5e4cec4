"""The curate steps, in order. Each module is one drop policy over the facts table:

    NAME                     the step's key in ``manifest.json`` ``stats``
    decide(rows, ctx)        marks rows dropped (``row.drop(reason, detail, dup_of)``) and returns
                             :class:`pipeline.curate.table.Counts`, or None when the step is not configured

A new step is a module here added to ``STEPS`` in :mod:`pipeline.curate.stage`.
"""
