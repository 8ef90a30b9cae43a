# The FeatureCloud app image: supervisord runs nginx (9000 -> the engine API, 9001 -> the
# status page) and the app itself (python3 -u /app/main.py on 127.0.0.1:5000).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx supervisor \
 && rm -rf /var/lib/apt/lists/*

# The CPU wheels: the default index would bring the much larger CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
# requirements.txt pins torch==2.14.1 too, so executorch / torchao (which depend on torch) find
# the CPU build installed above and pip does not replace it by the CUDA one; the check fails
# the build if it ever does.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
 && python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

COPY server_config/ /etc/fc-app/
COPY . /app
WORKDIR /app

EXPOSE 9000 9001
ENTRYPOINT ["sh", "/etc/fc-app/docker-entrypoint.sh"]
