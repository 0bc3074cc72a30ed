"""`jaxhack train` as a script (same flags): see jaxhack/commands/train.py or `--help`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
