"""`python -m latentmas` is the `latentmas` command."""

from latentmas.cli import main

main()
