# The image of the example deployment: the project and its Celery app, run as a non-root user.
# One image serves every service of docker-compose.yml (worker, Flower, metrics); the default
# command runs a worker. Build: docker build -t celery-governance .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The project itself, without its dev extras. Flower is not a dependency of the project, but
# the compose file runs it from this image, so it is installed alongside.
COPY pyproject.toml README.md ./
COPY governance ./governance
COPY workers ./workers
RUN pip install .

# The policy the deployment loads (mount your own over /app/config to change it without a
# rebuild), and the only directory the file tools may touch, owned by the unprivileged user.
COPY config ./config
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin governance \
    && mkdir -p /workspace \
    && chown governance:governance /workspace

# The example deployment (`workers`) is not in the installed package: it runs from /app.
ENV PYTHONPATH=/app \
    GOVERNANCE_CONFIG_PATH=/app/config/governance.yaml \
    GOVERNANCE_WORKSPACE_DIR=/workspace

USER governance

CMD ["celery", "-A", "workers.app", "worker", "--loglevel=INFO"]
