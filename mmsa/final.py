"""`python -m mmsa.final`: the command is mmsa/app/final.py (imported by `launch`, so that a
package missing there is one line, not a traceback)."""

from mmsa.app.commands import launch


def cli() -> None:
    """The console script's entry point."""
    launch("mmsa.app.final")


if __name__ == "__main__":
    cli()
