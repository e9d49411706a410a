# syntax=docker/dockerfile:1
# Dataport: one image for the api (the default command) and the workers (`dataport worker`).
# docker-compose.yml runs the whole stack from it; README.md, "Run the full stack".

# --- build: the project and its runtime dependencies (no test extra) in a virtualenv -------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY . .
# Every dependency ships a wheel for CPython 3.11 on Linux: no compiler needed. Not an editable
# install: the code lands in the venv's site-packages. The browser client (web/, not a Python
# package) goes beside the packages, where api/app.py looks for it (../web from api/app.py).
RUN pip install . \
 && if [ -d web ]; then \
      cp -r web "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/web"; \
    fi

# --- runtime --------------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATAPORT_DATA_DIR=/data
RUN groupadd --system --gid 10001 dataport \
 && useradd --system --uid 10001 --gid dataport --home-dir /home/dataport --create-home dataport \
 && mkdir /data && chown dataport:dataport /data
COPY --from=build /opt/venv /opt/venv
USER dataport
WORKDIR /home/dataport
EXPOSE 8000
# The api's liveness route; a worker container (no HTTP) turns this off (docker-compose.yml does).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# One api process unless DATAPORT_API_WORKERS (or --workers N) asks for more on the same port.
CMD ["dataport", "api", "--host", "0.0.0.0", "--port", "8000"]
