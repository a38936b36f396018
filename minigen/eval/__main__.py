"""`python -m minigen.eval`: see minigen/eval/cli.py."""
from minigen.cli import run_main
from minigen.eval.cli import main

run_main(main)
