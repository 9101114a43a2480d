# CPU image of the distributed run (docker-compose.yml builds it as sparkle-factory-cpu): the gateway, the
# orchestrator workers, flower, the model services' queue workers (they call their model server over HTTP)
# and the `cpu` profile's worker that runs the six `cpu` backends in-process. No CUDA, no torch: the model
# servers use services/Dockerfile.base. Build from the repository root:
#     docker build -t sparkle-factory-cpu .
# `--build-arg EXTRAS=serve,distributed,models` adds the model backends (torch, ...) for `--backend tiny`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
ARG EXTRAS=serve,distributed

# Dependencies first, in a layer that changes only with pyproject.toml. The wheels are self-contained
# (PyAV bundles FFmpeg, opencv-python-headless needs no X11/GL), so no system packages are needed.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ['EXTRAS'].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (the `sparkle` command and the sparkle.* packages).
COPY README.md ./
COPY shared ./shared
COPY orchestrator ./orchestrator
COPY services ./services
RUN pip install --no-deps . \
    && sparkle fetch-models \
    && useradd --create-home --uid 10001 sparkle

USER sparkle
EXPOSE 8080 5555
CMD ["sparkle", "--help"]
