"""`python -m mmsa.final`: the command is mmsa/app/final.py."""

from mmsa.app.final import cli

if __name__ == "__main__":
    cli()
