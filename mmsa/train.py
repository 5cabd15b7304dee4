"""`python -m mmsa.train`: the command is mmsa/app/train.py."""

from mmsa.app.train import cli

if __name__ == "__main__":
    cli()
