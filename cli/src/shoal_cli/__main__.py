"""``python -m shoal_cli``: the same as the ``shoal`` command."""

from shoal_cli.main import main

main()
