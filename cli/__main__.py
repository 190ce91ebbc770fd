"""`python -m cli ...` runs the hookpoints command (same as the console script)."""

from hookpoints.cli.main import main

main()
