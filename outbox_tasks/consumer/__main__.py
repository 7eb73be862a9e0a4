"""``python -m outbox_tasks.consumer consume ...`` (the same as ``outbox-tasks consume``)."""

from outbox_tasks.consumer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
