"""``python -m modalign`` (what ``torchrun -m modalign`` runs): the ``modalign`` command line."""

from modalign.cli.main import main

if __name__ == "__main__":
    main()
