import sys

try:
    from edgemoe_llamacpp.cli import entry
except KeyboardInterrupt:                  # Ctrl-C while Python imports the CLI
    sys.exit(130)

entry()
