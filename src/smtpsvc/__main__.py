"""`python -m smtpsvc` runs the command line."""

from smtpsvc.cli import main

main()
