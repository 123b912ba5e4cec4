"""Demo and test scaffolding, outside the production packages: the demo world (``world``), the local
fake web (``fakeweb``) and the ``kd3 demo`` driver (``demo``, registered as a ``kd3.commands`` plugin).

Sits above the application layer: it may import anything of kd3; nothing of kd3 imports it.
"""
