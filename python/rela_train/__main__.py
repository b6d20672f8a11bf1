"""``python -m rela_train``: the ``rela-train`` command line."""

from rela_train.cli import run

if __name__ == "__main__":
    run()
