"""`python -m mmsa.train`: the command is mmsa/app/train.py (imported by `launch`, so that a
package missing there is one line, not a traceback)."""

from mmsa.app.commands import launch


def cli() -> None:
    """The console script's entry point."""
    launch("mmsa.app.train")


if __name__ == "__main__":
    cli()
