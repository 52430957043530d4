import sys

try:
    from .cli import entry
except KeyboardInterrupt:                  # Ctrl-C while Python imports the CLI
    sys.exit(130)

entry()
