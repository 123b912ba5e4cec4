"""The application layer: the ``kd3`` CLI, ``kd3 inspect`` and the HTML report (the flows are in ``flows``)."""
