# The sentinel agent as a container image (CPU only: the agent does no tensor work on a GPU).
#   docker build -f deploy/agent.Dockerfile -t llm-sentinel-agent .      (from the repository root)
# Runs `sentinel-agent run` with deploy/sentinel-agent.yml as a non-root user; state in
# /var/lib/sentinel-agent (mount a volume there). docs/operations.md, "Container image".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch from the PyTorch index: the PyPI wheel for Linux pulls in CUDA (gigabytes).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/llm-sentinel
COPY pyproject.toml README.md ./
COPY sentinel_contract ./sentinel_contract
COPY agent ./agent
COPY sentinel ./sentinel
COPY examples ./examples
COPY grafana ./grafana
RUN pip install . && rm -rf /opt/llm-sentinel/build

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/sentinel-agent --shell /usr/sbin/nologin sentinel \
    && install -d -o sentinel -g sentinel -m 0750 /var/lib/sentinel-agent
COPY deploy/sentinel-agent.yml /etc/sentinel-agent/agent.yml

USER 10001:10001
WORKDIR /var/lib/sentinel-agent
VOLUME ["/var/lib/sentinel-agent"]

# statistics (ZeroMQ PULL), commands (ZeroMQ ROUTER), /metrics (HTTP); all bound to 127.0.0.1 by
# the default configuration, so run the container in the trainer's network namespace.
EXPOSE 5557 5558 9477

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=4).read(1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["sentinel-agent", "run", "--config", "/etc/sentinel-agent/agent.yml"]
