"""`python -m rnngen` entry point."""

from rnngen.cli import main

if __name__ == "__main__":
    main()
