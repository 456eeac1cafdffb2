# Runtime image for stage Jobs, training, inference and Spark driver/executor pods: Python 3.11, Java 17
# for Spark, tini. CUDA comes with torch's PyPI wheels (the nvidia-* packages), so any Debian bookworm
# base works; the host's driver is mounted by the NVIDIA container runtime.
#   make images                                             (here: a mmdebstrap root filesystem as BASE, buildah)
#   docker build -t ghcr.io/latentmas/latentmas:0.1.0 .     (elsewhere: the public debian:bookworm-slim)
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# A CA bundle mounted only while building (a TLS-intercepting proxy); not part of the image.
ARG BUILD_CA_BUNDLE=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The mmdebstrap base already carries these; a public base gets them from Debian.
RUN if ! (command -v python3.11 && command -v java && command -v tini && python3.11 -c 'import ensurepip') >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv openjdk-17-jre-headless tini \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY core core
COPY operator operator
COPY jobs jobs
COPY training training
COPY services services
COPY data data
# Spark's s3a jars (hadoop-aws matching pyspark's Hadoop + the AWS SDK bundle) go into Spark's own jars
# folder, on every driver's and executor's classpath. SparkApplication drivers run a .py file: the
# console script is linked under a .py name.
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE" SSL_CERT_FILE="$BUILD_CA_BUNDLE"; fi \
 && /opt/venv/bin/pip install -c constraints.txt . \
 && /opt/venv/bin/python -m latentmas.sparkjars \
 && mkdir -p /opt/latentmas \
 && ln -s /opt/venv/bin/latentmas /opt/latentmas/latentmas.py \
 && /opt/venv/bin/latentmas --help >/dev/null \
 && rm -rf /src /root/.cache
ENV PATH=/opt/venv/bin:$PATH \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 \
    LATENTMAS_CACHE=/tmp/latentmas-serve \
    LATENTMAS_IVY_CACHE=/tmp/ivy
RUN echo 'latentmas:x:10001:10001::/home/latentmas:/bin/sh' >> /etc/passwd \
 && echo 'latentmas:x:10001:' >> /etc/group \
 && mkdir -p /home/latentmas && chown 10001:10001 /home/latentmas
USER 10001:10001
WORKDIR /home/latentmas
# Spark on Kubernetes starts pods with the arguments `driver …` / `executor`; anything else runs as given.
ENTRYPOINT ["tini", "--", "/opt/venv/bin/python", "-m", "latentmas.entrypoint"]
CMD ["latentmas", "--help"]
