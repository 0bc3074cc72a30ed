"""`jaxhack extract` as a script (same flags): see jaxhack/commands/extract.py or `--help`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.commands.extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
