"""`kd3 teacher ...` (placeholder until the distill stage lands)."""
import argparse


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["train"], help="what to do")


def teacher_cli(args) -> int:
    from pipeline.errors import Kd3Error
    raise Kd3Error("kd3 teacher is not implemented yet")
