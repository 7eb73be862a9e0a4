"""``python -m outbox_tasks.cli ...`` (the same as ``outbox-tasks ...``)."""

from outbox_tasks.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
