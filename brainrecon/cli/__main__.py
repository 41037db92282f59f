"""``python -m brainrecon.cli``: the command line, as the ``brainrecon`` entry point runs it."""

from brainrecon.cli import main

main()
