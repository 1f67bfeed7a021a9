# One image for every process: `docker run IMAGE api|worker|beat|flower|simulator|migrate|...`
# runs that `sms-dispatch` subcommand (default: api).
#
#   docker build -t sms-dispatch:local .
#
# Pin the base by digest in CI (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: compilers live here only, for the rare dependency without a wheel for the platform.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install --yes --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, in their own layer: it is rebuilt only when the lock changes. Every
# package, transitive ones included, must match a hash in the lock.
COPY requirements.lock /app/requirements.lock
RUN pip install --require-hashes -r /app/requirements.lock

# Then the project itself, without resolving anything again. It is installed from its source
# tree in /app (editable) because `sms-dispatch migrate` reads alembic.ini and migrations/ from
# beside the packages; a wheel would leave them behind.
COPY pyproject.toml README.md alembic.ini /app/
COPY api /app/api
COPY worker /app/worker
COPY shared /app/shared
COPY simulator /app/simulator
COPY migrations /app/migrations
RUN pip install --no-deps --editable /app \
    && python -m compileall -q /app/api /app/worker /app/shared /app/simulator /app/migrations

# Runtime stage: the interpreter, the virtual environment and the source; no compilers, no pip
# cache, no apt lists. Everything is owned by root and read-only for the service user.
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric id, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} smsd \
    && useradd --system --uid ${APP_UID} --gid smsd --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin smsd

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# var/ (relative to the working directory) is the only place the service writes: the beat
# schedule and the simulator's self-signed certificate. Orchestrators mount a volume there
# when the root filesystem is read-only.
RUN mkdir /app/var && chown ${APP_UID}:${APP_UID} /app/var

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMSD_LOG_JSON=true \
    SMSD_API_HOST=0.0.0.0 \
    SMSD_SIMULATOR_HOST=0.0.0.0

WORKDIR /app
USER ${APP_UID}:${APP_UID}

# api, simulator (HTTP and HTTPS), flower
EXPOSE 8080 8090 8443 5555

ENTRYPOINT ["sms-dispatch"]
CMD ["api"]
