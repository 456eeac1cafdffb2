# Runtime image for stage Jobs, training and inference: CUDA runtime, Python 3.11, Java for Spark.
#   docker build -t ghcr.io/latentmas/latentmas:0.1.0 .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/*
# Python 3.11 (the project's supported version) from python-build-standalone through uv.
COPY --from=ghcr.io/astral-sh/uv:0.5.11 /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv /opt/venv --python 3.11
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY core core
COPY operator operator
COPY jobs jobs
COPY training training
COPY services services
# SparkApplication drivers run a .py file: the console script is linked under a .py name.
RUN uv pip install --python /opt/venv/bin/python -c constraints.txt . \
 && mkdir -p /opt/latentmas \
 && ln -s /opt/venv/bin/latentmas /opt/latentmas/latentmas.py \
 && /opt/venv/bin/latentmas --help >/dev/null
ENV PATH=/opt/venv/bin:$PATH \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    HF_HUB_OFFLINE=1 \
    LATENTMAS_CACHE=/tmp/latentmas-serve \
    LATENTMAS_IVY_CACHE=/tmp/ivy
RUN useradd --uid 10001 --create-home latentmas
USER 10001:10001
WORKDIR /home/latentmas
ENTRYPOINT ["tini", "--"]
CMD ["latentmas", "--help"]
