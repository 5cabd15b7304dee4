"""`python -m mmsa.predict`: the command is mmsa/app/predict.py."""

from mmsa.app.predict import cli

if __name__ == "__main__":
    cli()
