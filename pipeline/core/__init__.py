"""The kernel: config, run directory, file formats (records), io, errors, checkpoint, plugins.

Imports nothing of kd3 outside ``pipeline.core``; every stage and the application build on it.
"""
