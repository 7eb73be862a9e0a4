# outbox_tasks image: one image for every role (worker, beat, flower, migrate, CLI); the command
# picks the role, e.g. `celery -A outbox_tasks beat` or `outbox-tasks migrate`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes. A stub
# package stands in for the code so that pip resolves and installs the dependencies alone.
COPY pyproject.toml README.md ./
RUN mkdir outbox_tasks \
    && touch outbox_tasks/__init__.py \
    && pip install . \
    && pip uninstall -y outbox_tasks \
    && rm -rf outbox_tasks build ./*.egg-info

# The code, the migrations and alembic.ini. `outbox-tasks migrate` finds alembic.ini and
# migrations/ next to the package, so the package is imported from /app (PYTHONPATH); the
# installed copy provides the `outbox-tasks` command and the package metadata.
COPY alembic.ini ./
COPY migrations ./migrations
COPY outbox_tasks ./outbox_tasks
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -m compileall -q /app/outbox_tasks /app/migrations
ENV PYTHONPATH=/app

# Never run as root. A numeric user, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 outbox \
    && useradd --system --uid 10001 --gid outbox --home-dir /home/outbox --create-home \
       --shell /usr/sbin/nologin outbox
USER 10001:10001

# 9808: worker metrics (OUTBOX_METRICS_PORT); 5555: Flower.
EXPOSE 9808 5555

# SIGTERM makes Celery finish the batch in hand, mark it and release the lease (warm shutdown);
# give it the time: docker stop -t 60, Kubernetes terminationGracePeriodSeconds: 60.
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "outbox_tasks", "worker", "--loglevel=INFO"]
