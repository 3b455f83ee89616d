"""`python -m meshd` runs the daemon."""

from meshd.main import main

if __name__ == "__main__":
    main()
