"""`python -m sessions` runs the CLI."""

from sessions.cli import main

if __name__ == "__main__":
    main()
