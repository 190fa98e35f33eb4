# Postgres for the registry-free smoke run: Debian's postgresql package on the local base image,
# with the same environment contract as the official image (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB, /docker-entrypoint-initdb.d/*.sql), so deploy/docker-compose.yml works unchanged.
ARG BASE_IMAGE=shoal-base:bookworm
FROM ${BASE_IMAGE}
RUN set -eu; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql postgresql-client >/dev/null; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /run/postgresql; \
    chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY deploy/smoke/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
