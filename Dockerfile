# moe-serve image. CPU torch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t moe-serve:cuda .
# (and run it with --gpus all). BASE_IMAGE is any Debian-like image with python3 >= 3.10 and its venv module.
ARG BASE_IMAGE=python:3.11-slim

# --- build: a virtual environment holding torch and the service, copied whole into the runtime stage ---
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the device (CPU wheels are ~10x smaller than CUDA ones).
RUN python3 -m venv /opt/venv && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md constraints.txt /src/
COPY service /src/service
# constraints.txt pins torch==2.13.0, which a local build such as 2.13.0+cu126 also satisfies.
RUN pip install -c /src/constraints.txt /src && pip check \
    # C++ headers and torch's own C++ test binaries: only for compiling extensions, not for serving.
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/include /opt/venv/lib/python3*/site-packages/torch/test

# --- runtime: the base image, the environment, the models; no pip cache, no build context ---
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MOE_HOST=0.0.0.0 \
    MOE_PORT=8000 \
    MOE_MODELS_DIR=/app/models
RUN useradd --system --uid 10001 --gid 0 --home-dir /app --no-create-home moe \
    && mkdir -p /models && chown 10001:0 /models
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/entrypoint.sh /usr/local/bin/moe-entrypoint
COPY models /app/models
# ONNX graphs are build artefacts derived from the weights, not committed: built here for every baked-in model, so
# each serves its measured choice (config.json "serving") without writing into the image at run time.
RUN for m in /app/models/*/; do moe-serve export --model "$m" --quantize int8; done
WORKDIR /app
# Models of your own: mount a folder of model folders here; they are served next to the baked-in ones.
VOLUME ["/models"]
USER 10001
EXPOSE 8000
# Ready means every model loaded and warm (/v2/health/ready); a starting server answers 503 until then.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('MOE_PORT', '8000'), timeout=2).status != 200)"]
ENTRYPOINT ["moe-entrypoint"]
CMD ["moe-serve", "serve"]
