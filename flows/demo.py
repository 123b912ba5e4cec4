"""`kd3 demo` (placeholder until the demo issue lands)."""
import argparse


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    pass


def demo_cli(args) -> int:
    from pipeline.errors import Kd3Error
    raise Kd3Error("kd3 demo is not implemented yet")
