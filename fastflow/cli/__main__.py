"""``python -m fastflow.cli``, as ``python -m fastflow`` and the ``fastflow`` command."""

from . import main

raise SystemExit(main())
