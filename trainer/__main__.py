"""``python -m trainer`` is ``python -m trainer.run``."""

from trainer.run import main

if __name__ == "__main__":
    main(prog_name="python -m trainer")
