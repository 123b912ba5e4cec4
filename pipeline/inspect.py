"""`kd3 inspect` (placeholder until the inspect issue lands)."""
import argparse


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or manifest.json")


def inspect_cli(args) -> int:
    from pipeline.errors import Kd3Error
    raise Kd3Error("kd3 inspect is not implemented yet")
