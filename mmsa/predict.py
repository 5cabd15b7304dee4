"""`python -m mmsa.predict`: the command is mmsa/app/predict.py (imported by `launch`, so that a
package missing there is one line, not a traceback)."""

from mmsa.app.commands import launch


def cli() -> None:
    """The console script's entry point."""
    launch("mmsa.app.predict")


if __name__ == "__main__":
    cli()
