# smtpsvc in a container (docs/operations.md, "Install and run as a service"):
#   docker build -t smtpsvc .
#   docker run -d --name smtpsvc -p 25:2525 -v smtpsvc-data:/var/lib/smtpsvc --stop-timeout 30 smtpsvc
# SMTP listens on 0.0.0.0:2525 inside the container; the mailroot (pickup, queue, drop, badmail, log) and the
# AUTH accounts file live in the volume /var/lib/smtpsvc. The admin HTTP API (and the HEALTHCHECK) stays on
# 127.0.0.1:8025 inside the container: publish it only with admin.token_file set (see the docs).
# No secrets in the image: TLS keys, connector passwords and the admin token are mounted at run time.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --disable-pip-version-check --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMTPSVC__SERVER__ROOT=/var/lib/smtpsvc/mailroot \
    SMTPSVC__SERVER__LISTEN=0.0.0.0:2525
COPY --from=build /install /usr/local
RUN groupadd --system --gid 10025 smtpsvc \
    && useradd --system --uid 10025 --gid smtpsvc --home-dir /var/lib/smtpsvc --no-create-home \
       --shell /usr/sbin/nologin smtpsvc \
    && mkdir -p /var/lib/smtpsvc/mailroot \
    && chown -R smtpsvc:smtpsvc /var/lib/smtpsvc \
    && smtpsvc config check
# Relative paths (auth.users_file = "users.toml" when no config file is given) resolve here, in the volume.
WORKDIR /var/lib/smtpsvc
VOLUME /var/lib/smtpsvc
USER 10025:10025
EXPOSE 2525
# Python's standard library only (there is no curl in the slim image); no proxy is consulted.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import http.client, sys; c = http.client.HTTPConnection('127.0.0.1', 8025, timeout=4); c.request('GET', '/healthz'); sys.exit(0 if c.getresponse().status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpsvc"]
CMD ["serve"]
