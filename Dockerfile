# charlstm for cloud GPU nodes: the official Ray image + this project with its GPU extra.
#   docker build -t REGISTRY/charlstm:0.1.0 . && docker push REGISTRY/charlstm:0.1.0
# The tag matches pyproject.toml (ray 2.60.*, Python 3.11). Reproducible builds: every Python dependency is
# pinned with its hashes in requirements-docker.lock (`make lock` regenerates it from pyproject.toml), and the
# base should be pinned by digest too; a tag can be re-pushed. Look the digest up once and pass it:
#   docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cpu     (the "Digest:" line)
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu@sha256:<digest> -t ... .
# or write it into the default below (tests/test_dockerfile.py accepts both forms).
#
# One CUDA stack: TensorFlow's. TensorFlow 2.21 is built and tested against CUDA 12.5.1 and cuDNN 9
# (tf.sysconfig.get_build_info() of the 2.21.0 wheel), and its `and-cuda` extra (our `gpu` extra) installs
# exactly that as pip wheels (nvidia-cudnn-cu12 >= 9.3, nvidia-cublas-cu12 / cuda-runtime >= 12.5, NCCL).
# The Ray "-gpu" images are built on an nvidia/cuda base with a CUDA toolkit of their own, which would ship a
# second, different CUDA (and cuDNN) beside those wheels for nothing, so the base is Ray's Ubuntu ("-cpu")
# image. Only the NVIDIA driver comes from the node: the NVIDIA container toolkit mounts it when these
# capabilities are asked for (the CUDA base images set the same).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The image's own non-root user "ray" (uid 1000, gid 100 "users"), written numerically so that
# Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 1000:100
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Created by uid 1000 (WORKDIR alone makes root-owned folders on some builders).
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app

# The dependencies first (their layer is reused while only job/ changes), exactly as locked: every file's sha256
# is checked. The image's own ray 2.60.0 satisfies the lock's ray==2.60.0, so pip keeps it without re-checking
# it (pip verifies what it downloads; an installed distribution that meets the pin is left alone): cluster and
# image stay on the same Ray. TensorFlow comes with its CUDA wheels (the gpu extra).
COPY --chown=1000:100 requirements-docker.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-docker.lock

# Only what installing the package needs; .dockerignore keeps everything else out of the context. --no-deps:
# everything it needs is installed above; --no-build-isolation: built with the locked setuptools, nothing
# fetched unpinned.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 job/ ./job/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "import importlib.metadata as m; print('charlstm', m.version('charlstm'))"
