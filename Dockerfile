# moe-serve image: CPU by default. For CUDA, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the index that matches the device (CPU wheels are ~10x smaller than CUDA ones).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
RUN pip install -c constraints.txt . && pip check

COPY models ./models

RUN useradd --system --uid 10001 --home /app moe
USER moe

ENV MOE_HOST=0.0.0.0 \
    MOE_PORT=8000 \
    MOE_MODELS_DIR=/app/models

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready').status != 200)"

CMD ["moe-serve", "serve"]
