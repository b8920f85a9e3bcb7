"""``python -m hesslens`` runs the command-line interface."""

from hesslens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
