# The image every cluster definition in clusters/ runs: Ray 2.60 (Python 3.11, CUDA) with ray_unlearn and
# its locked dependencies (constraints.txt, the same lock as `make venv`).
#   docker build -t ray-unlearn:0.1.0 .                 # the tag clusters/*.yaml name (pyproject's version)
#   docker tag ray-unlearn:0.1.0 <registry>/ray-unlearn:0.1.0 && docker push <registry>/ray-unlearn:0.1.0
# The base image's Ray version and Python must match constraints.txt and pyproject.toml
# (tests/unit/test_clusters.py checks it, and that every pin below is the lock's).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
# dependencies first (a layer that changes only with the lock): torch's CUDA build, then deepspeed without
# build isolation (its build imports torch), then the package and the rest of the lock
COPY --chown=ray:users constraints.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt --no-build-isolation deepspeed==0.19.8
COPY --chown=ray:users ray_unlearn ./ray_unlearn
RUN pip install --no-cache-dir -c constraints.txt . \
 && python -c "import ray, torch, ray_unlearn; assert ray.__version__ == '2.60.0', ray.__version__"
# example jobs and serve configs, for entrypoints like `ray-unlearn run /app/jobs/soul_npo.yaml`
COPY --chown=ray:users jobs ./jobs
ENV HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
