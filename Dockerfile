# charlstm for cloud GPU nodes: the official Ray image + this project with its GPU extra.
#   docker build -t REGISTRY/charlstm:0.1.0 . && docker push REGISTRY/charlstm:0.1.0
# The tag matches pyproject.toml (ray 2.60.*, Python 3.11). For byte-for-byte reproducible builds, pin the
# digest too: FROM rayproject/ray:2.60.0-py311-cpu@sha256:...
#
# One CUDA stack: TensorFlow's. TensorFlow 2.21 is built and tested against CUDA 12.5.1 and cuDNN 9
# (tf.sysconfig.get_build_info() of the 2.21.0 wheel), and its `and-cuda` extra (our `gpu` extra) installs
# exactly that as pip wheels (nvidia-cudnn-cu12 >= 9.3, nvidia-cublas-cu12 / cuda-runtime >= 12.5, NCCL).
# The Ray "-gpu" images are built on an nvidia/cuda base with a CUDA toolkit of their own, which would ship a
# second, different CUDA (and cuDNN) beside those wheels for nothing, so the base is Ray's Ubuntu ("-cpu")
# image. Only the NVIDIA driver comes from the node: the NVIDIA container toolkit mounts it when these
# capabilities are asked for (the CUDA base images set the same).
FROM rayproject/ray:2.60.0-py311-cpu

ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The image's own non-root user "ray" (uid 1000, gid 100 "users"), written numerically so that
# Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 1000:100
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Created by uid 1000 (WORKDIR alone makes root-owned folders on some builders).
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app

# Only what installing the package needs; .dockerignore keeps everything else out of the context.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 job/ ./job/

# The image's ray 2.60.0 already satisfies ray==2.60.*, so pip keeps it (cluster and image stay on the
# same Ray) and adds TensorFlow with its CUDA wheels. "./[gpu]" is this folder with the gpu extra.
RUN pip install --no-cache-dir './[gpu]' \
    && rm -rf build ./*.egg-info \
    && python -c "import importlib.metadata as m; print('charlstm', m.version('charlstm'))"
