"""``python -m outbox_tasks.consumer consume ...`` (the same as ``outbox-tasks consume``): the
package's one command line (outbox_tasks.cli), run from here for compatibility."""

from outbox_tasks.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog_name="python -m outbox_tasks.consumer"))
